"""A row's method label: its method with the flex_attention or self-consistency settings that differ from the
defaults and how its table chose its paraphrases (flex[right,t0.7], avg[S3], vote[repeat])."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from constants import (DEFAULT_FEWSHOT_FORMAT, DEFAULT_FUSION_BIAS, DEFAULT_FUSION_TEMPERATURE, DEFAULT_POSITIONS,
                       DEFAULT_SC_PROMPTS, DEFAULT_SC_TEMPERATURE, DEFAULT_SC_TOP_P)

# flex_attention settings: those that differ from the defaults are part of the label (attn_backend only in the map)
VARIANT_DEFAULTS = {"positions": DEFAULT_POSITIONS, "fusion_bias": DEFAULT_FUSION_BIAS,
                    "fusion_temperature": DEFAULT_FUSION_TEMPERATURE, "fewshot_format": DEFAULT_FEWSHOT_FORMAT,
                    "isolation": "full", "beside": "none", "beside_weight": None,  # the last: only with a beside
                    "sc_prompts": DEFAULT_SC_PROMPTS, "sc_temperature": DEFAULT_SC_TEMPERATURE,
                    "sc_top_p": DEFAULT_SC_TOP_P}  # self-consistency's sampling
NUMERIC_TAGS = {"fusion_temperature": "t", "sc_temperature": "t", "sc_top_p": "p"}  # a number in a label: t0.7
EXTRA_COLUMNS = (*VARIANT_DEFAULTS, "attn_backend")
REQUIRED_SETTINGS = ("positions", "fusion_bias", "fusion_temperature", "fewshot_format")  # always in the label map
POSITION_ALIASES = {"aligned": "left"}  # flex_attention_generate.py runs --positions aligned as left
SHORT_NAMES = {"flex_attention": "flex", "self_consistency": "sc"}  # the method's name in a label with settings
SELF_CONSISTENCY = "self_consistency"
SINGLE_METHODS = ("per_prompt", "origin")  # one prompt per answer: no vote, no gain analysis


def is_missing(value: object) -> bool:
    """Whether a cell holds nothing: None or a scalar NaN / NA (a string or a list never does)."""
    return value is None or (not isinstance(value, str) and bool(np.ndim(value) == 0 and pd.isna(value)))


def _setting(column: str, value) -> str | None:
    """One flex_attention setting as it appears in a label (as in the file name), None for the default."""
    if is_missing(value):
        return None
    if column in NUMERIC_TAGS:
        return None if float(value) == VARIANT_DEFAULTS[column] else f"{NUMERIC_TAGS[column]}{float(value):g}"
    value = POSITION_ALIASES.get(value, value) if column == "positions" else value
    if value == VARIANT_DEFAULTS[column]:
        return None
    if column == "beside_weight":
        return f"w{float(value):g}"
    return {"fusion_bias": f"bias_{value}", "fewshot_format": f"fewshot_{value}", "isolation": f"isolation_{value}",
            "beside": f"beside_{value}"}.get(column, str(value))


def _indices(value, n: int) -> list[int]:
    """A row's paraphrase indices: its `paraphrase_indices` when recorded, else the first n."""
    return list(range(n)) if is_missing(value) else [int(i) for i in value]


def selections(rows: pd.DataFrame, n: int) -> list[list[int]]:
    """The paraphrase indices each row used: column `paraphrase_indices` when the table has it, else 0..n-1."""
    if "paraphrase_indices" not in rows.columns:
        return [list(range(n)) for _ in range(len(rows))]
    return [_indices(v, n) for v in rows["paraphrase_indices"]]


def table_design(df: pd.DataFrame) -> tuple[str, ...]:
    """How a table chose its paraphrases, part of its label: S<k> for k samples per question (`sample_index`),
    repeat when every row repeats one paraphrase; nothing for the first N."""
    if df["method"].isin(SINGLE_METHODS).all():
        return ()
    tags = [f"S{df['sample_index'].nunique()}"] if "sample_index" in df.columns else []
    if "paraphrase_indices" in df.columns:
        picked = [_indices(v, n) for v, n in zip(df["paraphrase_indices"], df["num_ensemble"])]
        if all(len(i) > 1 and len(set(i)) == 1 for i in picked):
            tags.append("repeat")
    return tuple(tags)


def with_tags(method: str, tags: Sequence[str]) -> str:
    """`method` when nothing differs from the defaults, else its short name with the tags: flex[right,t0.7]."""
    return f"{SHORT_NAMES.get(method, method)}[{','.join(tags)}]" if tags else method


def row_labels(df: pd.DataFrame) -> list[str]:
    """Per row its method label: the non-default flex_attention or self-consistency settings (K samples named where
    K is not N) and the table's paraphrase design."""
    design = table_design(df)
    settings = [(c, df[c].tolist()) for c in VARIANT_DEFAULTS if c in df.columns]
    samples = df["sc_samples"].tolist() if "sc_samples" in df.columns else [None] * len(df)
    return [with_tags(str(method), [s for c, values in settings if (s := _setting(c, values[i])) is not None]
                      + _samples_tag(samples[i], n) + list(design))
            for i, (method, n) in enumerate(zip(df["method"], df["num_ensemble"]))]


def _samples_tag(samples, n: int) -> list[str]:
    """k<K> when self-consistency sampled K answers for another N than K (K = N is its default)."""
    return [] if is_missing(samples) or int(samples) == int(n) else [f"k{int(samples)}"]
