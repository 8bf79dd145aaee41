"""The methods, each one function from a batch of questions to (result rows, decode statistics):
per_prompt / origin (every prompt alone), the logit-level ensembles (`fuse_logits` over the N rows of a
question at every step) and attention-level fusion (one fused row, the mask of segment_mask.py).
generate.py and flex_attention_generate.py are their commands; the benchmark calls them too."""
from __future__ import annotations

import math

import torch

from confidence import normalised_weights
from constants import DEFAULT_FEWSHOT_FORMAT, DEFAULT_FUSION_BIAS, DEFAULT_FUSION_TEMPERATURE, DEFAULT_POSITIONS, InputError
from dataset import Dataset, Record
from decoding import DecodeStats, StopRule, decode, fused_row, greedy, single_rows
from results import result_row
from segment_mask import SegmentMask, flex_available, segment_biases

AUTO_CUDA_BACKEND = "flex"  # --attn auto on CUDA; to be set from the GPU table (benchmarks/README.md)


def fuse_logits(logits: torch.Tensor, method: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per question from logits [Q, N, V] of its N paraphrases; weights [Q, N] sum to 1."""
    if method == "avg":
        return torch.log_softmax(logits, -1).mean(1).argmax(-1)
    if method == "max":
        return torch.softmax(logits, -1).max(1).values.argmax(-1)
    if method == "weighted_avg":
        return (weights.unsqueeze(-1) * torch.log_softmax(logits, -1)).sum(1).argmax(-1)
    if method == "weighted_max":  # the most confident paraphrase decides alone
        best = weights.argmax(1)
        return logits[torch.arange(len(logits)), best].argmax(-1)
    raise ValueError(f"unknown fusion method {method!r}")


def answer_per_prompt(model, tokenizer, dataset: Dataset, batch: list[Record], n: int | None, stop: StopRule,
                      method: str) -> tuple[list[dict], DecodeStats]:
    """per_prompt (each of the first n paraphrases alone; n None: every paraphrase of the question, as
    upstream) and origin (paraphrase 0 alone): one row per prompt, and the decode statistics."""
    counts = [1 if method == "origin" else n or len(r.paraphrases) for r in batch]
    parts = [dataset.prompt_parts(r, k) for r, k in zip(batch, counts)]
    jobs = [(record, p, i) for record, p, k in zip(batch, parts, counts) for i in range(k)]
    rows = [row for p, k in zip(parts, counts) for row in single_rows(tokenizer, p, list(range(k)))]
    outputs, stats = decode(model, tokenizer, rows, 1, greedy, stop)
    seconds = stats.seconds / len(rows)
    return [result_row(record, tokenizer, tokens, paraphrases=[record.paraphrases[i]], prompts=[p.full(i)],
                       seconds=seconds, method=method, num_ensemble=len(p.segments), paraphrase_index=i)
            for (record, p, i), tokens in zip(jobs, outputs)], stats


def answer_ensemble(model, tokenizer, dataset: Dataset, batch: list[Record], n: int, stop: StopRule, method: str,
                    conf: dict[str, list[float]] | None = None) -> tuple[list[dict], DecodeStats]:
    """avg / max / weighted_avg / weighted_max: N rows per question, one fused token per step; returns
    the result rows and the decode statistics."""
    parts = [dataset.prompt_parts(r, n) for r in batch]
    rows = [row for p in parts for row in single_rows(tokenizer, p, list(range(n)))]
    weights, fallback = [None] * len(batch), [False] * len(batch)
    if conf is not None:
        weights, fallback = zip(*(normalised_weights(conf[r.uuid]) for r in batch))
        all_weights = torch.tensor(weights, device=model.device)
    def choose(logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        return fuse_logits(logits, method, all_weights[live] if conf is not None else None)
    outputs, stats = decode(model, tokenizer, rows, n, choose, stop)
    seconds = stats.seconds / len(batch)
    return [result_row(record, tokenizer, tokens, paraphrases=record.paraphrases[:n],
                       prompts=[p.full(i) for i in range(n)], seconds=seconds, method=method, num_ensemble=n,
                       **(dict(weights=list(w), weights_fallback=fb) if conf is not None else {}))
            for record, p, tokens, w, fb in zip(batch, parts, outputs, weights, fallback)], stats


def answer_fused(model, tokenizer, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                 positions: str = DEFAULT_POSITIONS, backend: str = "sdpa", fusion_bias: str = DEFAULT_FUSION_BIAS,
                 weights: dict[str, tuple[list[float], bool]] | None = None, compile: bool = False,
                 temperature: float = DEFAULT_FUSION_TEMPERATURE, fewshot: str = DEFAULT_FEWSHOT_FORMAT
                 ) -> tuple[list[dict], DecodeStats]:
    """One fused row per question: (result rows, decode statistics). `weights` (uuid -> normalised
    confidences, fallback flag) for --fusion-bias confidence; `fewshot` fused shows each few-shot example
    as its N paraphrases too (their bias is -log N whenever a bias is on)."""
    parts = [dataset.prompt_parts(r, n, fewshot) for r in batch]
    rows = [fused_row(tokenizer, p, positions) for p in parts]
    biases = None
    if fusion_bias != "none":
        biases = torch.tensor([segment_biases(n, fusion_bias, weights and weights[r.uuid][0]) for r in batch],
                              device=model.device)
    outputs, stats = decode(model, tokenizer, rows, 1, greedy, stop, SegmentMask,
                            dict(backend=backend, biases=biases, dtype=model.dtype, compile=compile,
                                 temperature=temperature, example_bias=-math.log(n) if biases is not None else 0.0))
    seconds = stats.seconds / len(batch)
    return [result_row(record, tokenizer, tokens, paraphrases=record.paraphrases[:n],
                       prompts=[tokenizer.decode(row.input_ids)], seconds=seconds, method="flex_attention",
                       num_ensemble=n, positions=positions, attn_backend=backend, fusion_bias=fusion_bias,
                       fusion_temperature=temperature, fewshot_format=fewshot,
                       **(dict(zip(("weights", "weights_fallback"), weights[record.uuid])) if weights else {}))
            for record, row, tokens in zip(batch, rows, outputs)], stats


def resolve_backend(attn: str, compile: str, device: torch.device, device_map: str | None = None
                    ) -> tuple[str, bool, str]:
    """(backend, compiled, label) from --attn/--compile: auto is sdpa on CPU (measured faster there) and
    flex on CUDA (AUTO_CUDA_BACKEND: the GPU table in benchmarks/README.md is still to be measured). Nothing
    falls back: a backend that cannot run stops the run with one line."""
    backend = attn if attn != "auto" else (AUTO_CUDA_BACKEND if device.type == "cuda" else "sdpa")
    why = "" if attn != "auto" else (" (auto: sdpa measured faster on CPU)" if device.type != "cuda" else
                                     " (auto on CUDA: FlexAttention's block sparsity; not yet measured against sdpa)")
    if backend == "sdpa":
        if compile == "on":
            raise InputError("--compile on applies to --attn flex only; drop it or choose --attn flex")
        return backend, False, f"sdpa (dense mask){why}"
    if not flex_available():
        raise InputError(f"--attn flex: this torch ({torch.__version__}) has no FlexAttention; "
                         f"upgrade torch or choose --attn sdpa")
    if device_map:  # the BlockMask and score_mod tensors live on one device; layers would sit on several
        raise InputError(f"--attn flex with --device-map {device_map}: the mask cannot follow layers across "
                         f"devices; use --attn sdpa (its dense mask is moved with each layer's inputs)")
    compiled = compile == "on" or (compile == "auto" and device.type == "cuda")
    if compiled and device.type != "cuda":
        raise InputError("--compile on: compiled FlexAttention fails on CPU with growing decode shapes (an inductor "
                         "C++ error in torch 2.13); use --compile off (eager flex) or --attn sdpa")
    return backend, compiled, f"flex ({'compiled' if compiled else 'eager'}){why}"
