"""The attention-level fusion settings: one frozen object from the flags to the row. The command builds
it from its flags (cli.fusion_settings), `methods.answer_fused` and `SegmentMask` decode with it, and it
names the output table, writes its fields into every row and into the table's settings; the study grid,
the debug tool, the example and the benchmark are lists of it."""
from __future__ import annotations

import math
from dataclasses import dataclass

from constants import (DEFAULT_FEWSHOT_FORMAT, DEFAULT_FUSION_BIAS, DEFAULT_FUSION_TEMPERATURE, DEFAULT_POSITIONS,
                       InputError)
from dataset import FEWSHOT_FORMATS

POSITIONS = ("left", "right", "continuous")  # "aligned" is accepted for "left" (earlier scripts spell it so), here only
FUSION_BIASES = ("none", "uniform", "sqrt", "confidence", "agreement", "shares")  # or a number B: log of APE's scale S
BESIDE = ("none", "singles", "prior")  # rows decoded beside the fused row, their log-probabilities combined
ISOLATIONS = ("full", "none")  # none: the paraphrases as one plain causal sequence (upstream's -n ablation)
BACKENDS = ("sdpa", "flex")


@dataclass(frozen=True)
class FusionSettings:
    """How the N paraphrases of a question are fused in one sequence.

    positions: left (every paraphrase starts after the prefix), right (every one ends before the suffix)
        or continuous (0..L-1, upstream's); bias: the answer's score bias on paraphrase keys (none, uniform
        -log N, sqrt -1/2 log N (the default), confidence / agreement log w (w from sampled answers / from the N
        single answers' votes), shares log w with w ~ 1/(the paraphrase's attention share at the first token
        under uniform), or a number B on
        every paraphrase: log of APE's scale S); temperature:
        those scores divided by T (APE); fewshot: single (each example as one question) or fused (as its N
        isolated paraphrases); backend: sdpa (dense mask) or flex (FlexAttention BlockMask), compiled or
        eager; isolation: full, or none (the paraphrases see each other, causally: an ablation);
        record_attention: each generated token's attention share per segment kept in the row; beside: rows
        decoded next to the fused one, their log-probabilities combined at every step with beside_weight w:
        singles (the N plain prompts: (1-w) fused + w avg of them; w=1 is logit avg) or prior (the prompt with
        no question, contrasted as in PCED/context-aware decoding: (1+w) fused - w prior, over the tokens
        the fused row finds plausible)."""
    positions: str = DEFAULT_POSITIONS
    bias: str = DEFAULT_FUSION_BIAS
    temperature: float = DEFAULT_FUSION_TEMPERATURE
    fewshot: str = DEFAULT_FEWSHOT_FORMAT
    backend: str = "sdpa"
    compile: bool = False
    isolation: str = "full"
    record_attention: bool = False
    beside: str = "none"
    beside_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.positions == "aligned":
            object.__setattr__(self, "positions", "left")
        if self.bias not in FUSION_BIASES:
            object.__setattr__(self, "bias", repr(numeric_bias(self.bias)))  # the shortest exact spelling
        for flag, value, choices in (("--positions", self.positions, POSITIONS),
                                     ("--fewshot-format", self.fewshot, FEWSHOT_FORMATS),
                                     ("--attn", self.backend, BACKENDS), ("--isolation", self.isolation, ISOLATIONS),
                                     ("--beside", self.beside, BESIDE)):
            if value not in choices:
                raise InputError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"--fusion-temperature must be a finite number > 0, got {self.temperature}")
        object.__setattr__(self, "temperature", float(self.temperature))
        self.check_beside()
        if self.compile and self.backend != "flex":
            raise InputError("--compile on applies to --attn flex only; drop it or choose --attn flex")

    def check_beside(self) -> None:
        if not (math.isfinite(self.beside_weight) and self.beside_weight >= 0):
            raise InputError(f"--beside-weight must be a finite number >= 0, got {self.beside_weight}")
        object.__setattr__(self, "beside_weight", float(self.beside_weight))
        if self.beside == "singles" and self.beside_weight > 1:
            raise InputError(f"--beside singles: --beside-weight is the avg's share, in [0, 1]; got {self.beside_weight}")
        if self.beside != "none" and self.temperature != 1.0:  # the rows beside are plain prompts: no 1/T there
            raise InputError("--beside applies with --fusion-temperature 1 only")

    def variant(self) -> str:
        """The settings that differ from the defaults, as the output name spells them ('' for the defaults);
        the backend never changes the answer, so it is not part of the name."""
        spelled = ((self.positions, DEFAULT_POSITIONS), (f"bias_{self.bias}", f"bias_{DEFAULT_FUSION_BIAS}"),
                   (f"t{self.temperature:g}", f"t{DEFAULT_FUSION_TEMPERATURE:g}"),
                   (f"fewshot_{self.fewshot}", f"fewshot_{DEFAULT_FEWSHOT_FORMAT}"),
                   (f"isolation_{self.isolation}", "isolation_full"),
                   (f"beside_{self.beside}_w{self.beside_weight:g}" if self.beside != "none" else "", ""))
        return "".join(f"-{value}" for value, default in spelled if value != default)

    def encoding(self) -> "FusionSettings":
        """What the paraphrases' K/V depend on: each paraphrase reads only the prefix and itself, so bias,
        temperature and rows beside (what the answer reads) change nothing before the answer cue; only the
        positions, the isolation, the few-shot format and the backend do. Fused few-shot examples are read
        by the paraphrases with the examples' bias and 1/T, which then count too. Variants with one
        encoding decode from one prefill (methods.decode_fusions)."""
        if self.fewshot != "fused":
            bias, temperature = "none", 1.0
        else:  # the examples' bias: -1/2 log N under sqrt, none under none, -log N under any other
            bias, temperature = (self.bias if self.bias in ("none", "sqrt") else "uniform"), self.temperature
        return FusionSettings(self.positions, bias, temperature, self.fewshot, self.backend, self.compile,
                              self.isolation)

    def table_name(self, n: int) -> str:
        """flex_attention-<N>.feather for the defaults; other variants named, so they sit side by side."""
        return f"flex_attention-{n}{self.variant()}.feather"

    def row_fields(self) -> dict:
        """The columns every result row of attention-level fusion carries."""
        fields = dict(positions=self.positions, attn_backend=self.backend, fusion_bias=self.bias,
                      fusion_temperature=self.temperature, fewshot_format=self.fewshot)
        return {**fields, **self.optional_fields()}

    def optional_fields(self) -> dict:
        """The settings added after the first tables were written: kept only where they are not the default."""
        return {**({"isolation": self.isolation} if self.isolation != "full" else {}),
                **(dict(beside=self.beside, beside_weight=self.beside_weight) if self.beside != "none" else {})}

    def table_settings(self) -> dict:
        """What the table's settings file keeps of these (compared on resume) beyond the flags."""
        extra = self.optional_fields()
        return {"attn": self.backend, "compile": self.compile, **extra,
                **({"record_attention": True} if self.record_attention else {})}

    def describe(self) -> str:
        """One line for the user: what this run decodes with (the backend is said with its reason apart)."""
        return (f"positions {self.positions}; fusion bias {self.bias}; fusion temperature {self.temperature:g}; "
                f"few-shot format {self.fewshot}; isolation {self.isolation}"
                f"{f'; beside {self.beside} (weight {self.beside_weight:g})' if self.beside != 'none' else ''}"
                f"{'; recording attention shares' if self.record_attention else ''}")


def numeric_bias(text: str) -> float:
    """A --fusion-bias that is a number: finite, or a one-line error naming the choices."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"--fusion-bias {text!r}: choose one of {', '.join(FUSION_BIASES)} or a number "
                         f"(log of APE's scale S)") from None
    if not math.isfinite(value):
        raise InputError(f"--fusion-bias {text!r}: a numeric bias must be finite")
    return value
