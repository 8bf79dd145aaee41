"""The methods, each one function from a batch of questions to (result rows, decode statistics):
per_prompt / origin (every prompt alone), the logit-level ensembles (`fuse_logits` over the N rows of a
question at every step) and attention-level fusion (one fused row, the mask of segment_mask.py).
generate.py and flex_attention_generate.py are their commands; the benchmark calls them too."""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable

import torch

from confidence import normalised_weights, row_generator
from constants import DEFAULT_SC_PROMPTS, DEFAULT_SC_TEMPERATURE, DEFAULT_SC_TOP_P, SC_PROMPTS, InputError
from dataset import Dataset, Record
from decoding import (Chooser, DecodeStats, Encoded, LanguageModel, Renderer, Row, StopRule, answer_text, decode,
                      encode_rows, fused_row, greedy, shared_prefix_length, single_rows)
from fusion import FusionSettings
from results import result_row
from segment_mask import AttentionShares, SegmentMask, flex_available, segment_biases

AUTO_CUDA_BACKEND = "flex"  # --attn auto on CUDA; to be set from the GPU table (benchmarks/README.md)
FUSION_METHODS = ("avg", "avg_prob", "max", "weighted_avg", "weighted_max")
PLAUSIBLE = 0.1  # beside prior: only tokens with >= 0.1 x the fused row's top probability (contrastive decoding's cut)


def fused_scores(logits: torch.Tensor, method: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The scores [Q, V] a fusion rule takes the argmax of, from logits [Q, N, V] of a question's N paraphrases;
    weights [Q, N] sum to 1. Probabilities for PROBABILITY_RULES, log-probabilities (or logits) for the others."""
    if method == "avg":  # the mean of log-probabilities (a product of experts)
        return torch.log_softmax(logits, -1).mean(1)
    if method == "avg_prob":  # the mean of probabilities (a mixture, M-Ped's)
        return torch.softmax(logits, -1).mean(1)
    if method == "max":
        return torch.softmax(logits, -1).max(1).values
    if method == "weighted_avg":
        return (weights.unsqueeze(-1) * torch.log_softmax(logits, -1)).sum(1)
    if method == "weighted_max":  # the most confident paraphrase decides alone
        return logits[torch.arange(len(logits)), weights.argmax(1)]
    raise ValueError(f"unknown fusion method {method!r}")


PROBABILITY_RULES = ("avg_prob", "max")  # their fused scores are probabilities, the others' log-domain


def fuse_logits(logits: torch.Tensor, method: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per question from logits [Q, N, V] of its N paraphrases; weights [Q, N] sum to 1."""
    return fused_scores(logits, method, weights).argmax(-1)


def fused_logprobs(logits: torch.Tensor, method: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The fused distribution [Q, V] as log-probabilities: the fused scores renormalised (log-softmax of
    log-domain scores; probabilities divided by their sum: max's do not sum to 1). Its argmax is `fuse_logits`'."""
    scores = fused_scores(logits, method, weights)
    if method in PROBABILITY_RULES:
        return torch.log(scores / scores.sum(-1, keepdim=True))
    return torch.log_softmax(scores, -1)


def first_row_logprobs(logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The distribution a single row (or the fused row) chooses from: log-softmax of its logits [Q, 1, V]."""
    return torch.log_softmax(logits[:, 0], -1)


class Recorder:
    """A chooser around `choose` that keeps, per question of the decode, the log-probability of each token chosen
    under `distribution` (logits, live -> log-probabilities [Q, V]): a row's calibration fields. Wrapping the
    chooser keeps the decode loop (decoding.decode) as it is."""

    def __init__(self, choose: Chooser, distribution: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 = first_row_logprobs):
        self.choose, self.distribution = choose, distribution
        self.logprobs: dict[int, list[float]] = defaultdict(list)

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        tokens = self.choose(logits, live)
        chosen = self.distribution(logits, live).gather(-1, tokens[:, None])[:, 0]
        for q, value in zip(live.tolist(), chosen.tolist()):
            self.logprobs[q].append(value)
        return tokens

    def fields(self, q: int) -> dict:
        return calibration_fields(self.logprobs[q])


def calibration_fields(token_logprobs: list[float], confidence: float | None = None) -> dict:
    """A row's answer_logprob (its tokens' log-probabilities summed), token_logprobs and confidence (the answer's
    sequence probability, unless given: a vote's share)."""
    total = float(sum(token_logprobs))
    return dict(answer_logprob=total, token_logprobs=list(token_logprobs),
                confidence=math.exp(total) if confidence is None else float(confidence))


def combine_beside(logits: torch.Tensor, beside: str, weight: float) -> torch.Tensor:
    """Log-probabilities [Q, V] of each question's next token from logits [Q, 1 + k, V]: its fused row
    (index 0) and the k rows decoded beside it (FusionSettings.beside): singles (1-w) fused + w avg of the
    N plain prompts; prior (1+w) fused - w prior, on the tokens the fused row finds plausible."""
    fused = torch.log_softmax(logits[:, 0], -1)
    if beside == "none":
        return fused
    if beside == "singles":
        return (1 - weight) * fused + weight * torch.log_softmax(logits[:, 1:], -1).mean(1)
    if beside == "prior":
        plausible = fused >= fused.max(-1, keepdim=True).values + math.log(PLAUSIBLE)
        contrast = (1 + weight) * fused - weight * torch.log_softmax(logits[:, 1], -1)
        return torch.where(plausible, contrast, torch.finfo(contrast.dtype).min)
    raise ValueError(f"unknown beside {beside!r}")


def beside_rows(lm: LanguageModel, dataset: Dataset, record: Record, n: int, beside: str) -> list[Row]:
    """The rows decoded beside a question's fused row: none, its N plain prompts, or its question-free prompt."""
    if beside == "none":
        return []
    if beside == "singles":
        return single_rows(lm.tokenizer, dataset.prompt_parts(record, n), list(range(n)))
    return single_rows(lm.tokenizer, dataset.prompt_parts(question_free(record), 1), [0])


def question_free(record: Record) -> Record:
    """The record asked with an empty question (the dataset's own template around ""): the prompt whose answer
    is what the model says from the instruction and examples alone, the prior that `beside prior` subtracts."""
    return Record(record.uuid, [""], record.answers)


def token_counts(rows: list[Row], tokens: list[int]) -> dict:
    """What one question's rows cost in tokens run through the model, independent of its batch: its prompt
    tokens beyond the shared prefix (the instruction and examples, fused ones too, encoded once per run) and
    its decode steps' tokens (every generated token but the last runs through each of its rows)."""
    prompt = sum(len(row.input_ids) for row in rows) - len(rows) * shared_prefix_length(rows)
    return dict(prompt_tokens=int(prompt), decode_tokens=max(len(tokens) - 1, 0) * len(rows))


def answer_per_prompt(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int | None, stop: StopRule,
                      method: str) -> tuple[list[dict], DecodeStats]:
    """per_prompt (each of the first n paraphrases alone; n None: every paraphrase of the question, as
    upstream) and origin (paraphrase 0 alone): one row per prompt, and the decode statistics."""
    counts = [1 if method == "origin" else n or len(r.paraphrases) for r in batch]
    parts = [dataset.prompt_parts(r, k) for r, k in zip(batch, counts)]
    jobs = [(record, p, i) for record, p, k in zip(batch, parts, counts) for i in range(k)]
    rows = [row for p, k in zip(parts, counts) for row in single_rows(lm.tokenizer, p, list(range(k)))]
    recorder = Recorder(greedy)
    outputs, stats = decode(lm, rows, 1, recorder, stop)
    seconds = stats.seconds / len(rows)
    return [result_row(record, lm.tokenizer, tokens, paraphrases=[record.paraphrases[i]], prompts=[p.full(i)],
                       seconds=seconds, method=method, num_ensemble=len(p.segments), paraphrase_index=i,
                       **token_counts([row], tokens), **recorder.fields(j))
            for j, ((record, p, i), row, tokens) in enumerate(zip(jobs, rows, outputs))], stats


def answer_ensemble(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule, method: str,
                    conf: dict[str, list[float]] | None = None) -> tuple[list[dict], DecodeStats]:
    """avg / avg_prob / max / weighted_avg / weighted_max: N rows per question, one fused token per step;
    returns the result rows and the decode statistics."""
    parts = [dataset.prompt_parts(r, n) for r in batch]
    rows = [single_rows(lm.tokenizer, p, list(range(n))) for p in parts]
    weights, fallback = [None] * len(batch), [False] * len(batch)
    if conf is not None:
        weights, fallback = zip(*(normalised_weights(conf[r.uuid]) for r in batch))
        all_weights = torch.tensor(weights, device=lm.device)

    def live_weights(live: torch.Tensor) -> torch.Tensor | None:
        return all_weights[live] if conf is not None else None

    def choose(logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        return fuse_logits(logits, method, live_weights(live))
    recorder = Recorder(choose, lambda logits, live: fused_logprobs(logits, method, live_weights(live)))
    outputs, stats = decode(lm, [row for question in rows for row in question], n, recorder, stop)
    seconds = stats.seconds / len(batch)
    return [result_row(record, lm.tokenizer, tokens, paraphrases=record.paraphrases[:n],
                       prompts=[p.full(i) for i in range(n)], seconds=seconds, method=method, num_ensemble=n,
                       **token_counts(question, tokens), **recorder.fields(q),
                       **(dict(weights=list(w), weights_fallback=fb) if conf is not None else {}))
            for q, (record, p, question, tokens, w, fb) in enumerate(zip(batch, parts, rows, outputs, weights,
                                                                         fallback))], stats


@dataclass(frozen=True)
class SelfConsistency:
    """Self-consistency's settings (Wang et al. 2022): K answers sampled per question (samples; None: N, the vote's
    decodes), at temperature and top-p, from the first paraphrase or from each of the N in turn (prompts: first
    or each, sample k reading paraphrase k mod N); the run's seed, from which every sample's own seed is made."""
    samples: int | None = None
    temperature: float = DEFAULT_SC_TEMPERATURE
    top_p: float = DEFAULT_SC_TOP_P
    prompts: str = DEFAULT_SC_PROMPTS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise InputError(f"--sc-samples must be at least 1, got {self.samples}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"--sc-temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"--sc-top-p must be in (0, 1], got {self.top_p}")
        if self.prompts not in SC_PROMPTS:
            raise InputError(f"--sc-prompts {self.prompts!r}: choose one of {', '.join(SC_PROMPTS)}")

    def count(self, n: int) -> int:
        return self.samples or n

    def paraphrase(self, k: int, n: int) -> int:
        """Which paraphrase sample k reads."""
        return 0 if self.prompts == "first" else k % n

    def table_name(self, n: int) -> str:
        """ensemble_self_consistency-<N>.feather at the defaults; each, T, top-p and K named where they differ, in
        the order of the report's label (sc[each,t0.5,p0.9,k10])."""
        spelled = ((self.prompts, DEFAULT_SC_PROMPTS), (f"t{self.temperature:g}", f"t{DEFAULT_SC_TEMPERATURE:g}"),
                   (f"p{self.top_p:g}", f"p{DEFAULT_SC_TOP_P:g}"), (f"k{self.count(n)}", f"k{n}"))
        return f"ensemble_self_consistency-{n}{''.join(f'-{v}' for v, d in spelled if v != d)}.feather"

    def flags(self, n: int | None) -> dict:
        """The settings a table's rows and settings file keep (K resolved once N is known)."""
        return dict(sc_samples=self.count(n) if n else self.samples, sc_temperature=float(self.temperature),
                    sc_top_p=float(self.top_p), sc_prompts=self.prompts)

    def generators(self, record: Record, k: int) -> list[torch.Generator]:
        """One generator per sample, seeded from the run's seed, the question's uuid and selection and the sample's
        index: a question's samples never depend on the questions batched with it, so a resumed run repeats them."""
        key = f"self_consistency:{self.seed}:{record.uuid}:{getattr(record, 'sample', None)}"
        return [row_generator(key, j) for j in range(k)]


class SeededSampler:
    """Sampling through transformers' own logits warpers (TemperatureLogitsWarper, then TopPLogitsWarper below
    top-p 1), row r of the decode drawn with its own generator generators[r]."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
        self.generators = generators
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature),
                                            *([TopPLogitsWarper(top_p)] if top_p < 1 else [])])

    def distribution(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """The warped distribution [R, V] as log-probabilities: what each token is drawn from."""
        return torch.log_softmax(self.warpers(None, logits[:, 0]), -1)

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        probs = self.distribution(logits, live).exp().cpu()
        draws = [torch.multinomial(p, 1, generator=self.generators[r]) for p, r in zip(probs, live.tolist())]
        return torch.cat(draws).to(logits.device)


def answer_self_consistency(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                            sc: SelfConsistency = SelfConsistency()) -> tuple[list[dict], DecodeStats]:
    """K sampled answers per question (`SelfConsistency`), one row per question (`sampled_row`)."""
    k = sc.count(n)
    reads = [sc.paraphrase(j, n) for j in range(k)]
    parts = [dataset.prompt_parts(r, n if sc.prompts == "each" else 1) for r in batch]  # as per_prompt / origin
    rows = [[prompts[i] for i in reads] for prompts in (single_rows(lm.tokenizer, p, sorted(set(reads)))
                                                        for p in parts)]
    sampler = SeededSampler([g for record in batch for g in sc.generators(record, k)], sc.temperature, sc.top_p)
    recorder = Recorder(sampler, sampler.distribution)
    outputs, stats = decode(lm, [row for question in rows for row in question], 1, recorder, stop)
    seconds = stats.seconds / len(batch)
    samples = [(tokens, recorder.logprobs[s]) for s, tokens in enumerate(outputs)]
    return [sampled_row(lm, record, p, question, reads, samples[q * k:(q + 1) * k], n, sc.flags(n), seconds)
            for q, (record, p, question) in enumerate(zip(batch, parts, rows))], stats


def sampled_row(lm: LanguageModel, record: Record, parts, rows: list[Row], reads: list[int],
                samples: list[tuple[list[int], list[float]]], n: int, flags: dict, seconds: float) -> dict:
    """A question's self-consistency row from its K samples (tokens, their log-probabilities under the warped
    distribution), sample k read from rows[k] (paraphrase reads[k]): the majority of the K answers with the
    post-hoc vote's key and tie rule (scoring.vote), its confidence the vote's share. The row keeps every sample:
    samples, sample_token_ids, sample_logprobs, sample_paraphrase_indices; its cost is the K decodes'."""
    from scoring import normalize, vote
    answers = [answer_text(lm.tokenizer, tokens)[0] for tokens, _ in samples]
    pick, share = vote([normalize(a) for a in answers])
    used = sorted(set(reads))
    costs = [token_counts([row], tokens) for row, (tokens, _) in zip(rows, samples)]
    indices = record.indices or list(range(len(record.paraphrases)))  # a selection's, as result_row maps them
    return result_row(record, lm.tokenizer, samples[pick][0], paraphrases=[record.paraphrases[i] for i in used],
                      prompts=[parts.full(i) for i in used], seconds=seconds, method="self_consistency",
                      num_ensemble=n, **{key: sum(c[key] for c in costs) for key in costs[0]},
                      **calibration_fields(samples[pick][1], confidence=share), **flags, samples=answers,
                      sample_token_ids=[tokens for tokens, _ in samples],
                      sample_logprobs=[sum(logprobs) for _, logprobs in samples],
                      sample_paraphrase_indices=[indices[i] for i in reads])


Weights = dict[str, tuple[list[float], bool]]  # uuid -> (normalised weights, fallback flag): biases confidence,
# agreement and shares


def fusion_biases(settings: FusionSettings, batch: list[Record], n: int, weights: Weights | None,
                  device) -> torch.Tensor | None:
    """[B, N] score biases of the question's paraphrases (None without a bias); `weights` (uuid ->
    normalised weights, fallback flag) for bias confidence, agreement and shares."""
    if settings.bias == "none":
        return None
    if settings.bias in ("confidence", "agreement", "shares") and weights is None:
        raise ValueError(f"fusion bias {settings.bias} needs each question's weights")
    return torch.tensor([segment_biases(n, settings.bias, weights and weights[r.uuid][0]) for r in batch],
                        device=device)


def share_weights(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                  settings: FusionSettings, encodings: dict | None = None) -> dict[str, tuple[list[float], bool]]:
    """bias shares: one token decoded first under the uniform bias, its attention share on each paraphrase s_i
    (averaged over heads and layers), and weights w_i proportional to 1/s_i (uuid -> (weights, False)): the
    bias log w_i then gives every paraphrase about the same share of the answer's attention. Equal shares give
    w = 1/N, the uniform bias itself. `encodings`: the batch's encodings to share (`decode_fusions`)."""
    first = replace(settings, bias="uniform", record_attention=True, beside="none")
    [(_, _, shares)], _ = decode_fusions(lm, dataset, batch, n, StopRule(stop.eos_ids, 1, False), [first], [None],
                                         [greedy], encodings)
    weights = {}
    for b, record in enumerate(batch):
        inverse = [1.0 / max(s, 1e-9) for s in shares.shares(b)[0][1:n + 1]]
        weights[record.uuid] = ([x / sum(inverse) for x in inverse], False)
    return weights


def fusion_stacks(variants: list[FusionSettings]) -> list[list[int]]:
    """The variants (their indices) decoded together as rows of one batch: one encoding, the same rows beside,
    all at T = 1 or none (1/T takes the dense backend's own kernel); a variant recording attention alone."""
    stacks: dict[tuple, list[int]] = {}
    for i, v in enumerate(variants):
        stacks.setdefault((v.encoding(), v.beside, v.temperature != 1.0, i if v.record_attention else None),
                          []).append(i)
    return list(stacks.values())


def decode_fusions(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                   variants: list[FusionSettings], weights: list[Weights | None], chooses: list[Chooser],
                   encodings: dict | None = None
                   ) -> tuple[list[tuple[list[list[Row]], list[list[int]], AttentionShares | None]], DecodeStats]:
    """A batch of questions decoded under each of `variants` (with its `weights` for the biases confidence,
    agreement and shares, and its chooser): per variant (rows per question: the fused row, then the rows beside
    it; generated tokens; the fused rows' attention shares when settings.record_attention, else None), and the
    decode statistics of them all. The one decode of attention-level fusion: the commands, the sweep, the debug
    tool and the example all come here. Variants with one encoding (FusionSettings.encoding) share one prefill
    of the prefix and the paraphrases (`encodings`: those made for this batch, by key); those that also have
    the same rows beside decode on from it together, as rows of one batch (`fusion_stacks`)."""
    start, encodings = time.perf_counter(), {} if encodings is None else encodings
    results: list = [None] * len(variants)
    stats = DecodeStats()
    for members in fusion_stacks(variants):
        rows, outputs, shares, used = decode_stack(lm, dataset, batch, n, stop, [variants[i] for i in members],
                                                   [weights[i] for i in members], [chooses[i] for i in members],
                                                   encodings)
        stats = stats.add(used)
        for j, i in enumerate(members):
            results[i] = (rows, outputs[j * len(batch):(j + 1) * len(batch)], shares)
    stats.seconds = time.perf_counter() - start
    return results, stats


def decode_stack(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                 stack: list[FusionSettings], weights: list[Weights | None], chooses: list[Chooser], encodings: dict
                 ) -> tuple[list[list[Row]], list[list[int]], AttentionShares | None, DecodeStats]:
    """One stack of `fusion_stacks`: each variant's copy of the batch's rows decoded on from their encoding, the
    variants one after the other in the batch (variant v's question q is the decode's question v * B + q)."""
    first, stats = stack[0], DecodeStats()
    rows = [[fused_row(lm.tokenizer, dataset.prompt_parts(r, n, first.fewshot), first.positions),
             *beside_rows(lm, dataset, r, n, first.beside)] for r in batch]
    encoded = stack_encoding(lm, rows, n, first, encodings, stats)
    per_variant = len(encoded.ids)
    if len(stack) > 1:  # each variant its own copy of the rows (a stack of one decodes the encoding as it is)
        encoded = encoded.take(list(range(per_variant)) * len(stack))
    per_question = len(rows[0])
    biases = stack_biases(stack, batch, n, weights, per_question, lm.device)
    temperatures = [v.temperature for v in stack for _ in range(per_variant)] if first.temperature != 1 else None
    masks = []

    def renderer(segment_ids: torch.Tensor, max_new_tokens: int, positions: torch.Tensor | None = None
                 ) -> SegmentMask:  # kept: its shares are returned
        masks.append(SegmentMask(segment_ids, max_new_tokens, first, biases, lm.model.dtype, paraphrases=n,
                                 positions=positions, temperatures=temperatures))
        return masks[-1]
    flat = [row for _ in stack for question in rows for row in question]
    outputs, used = decode(lm, flat, per_question, stack_chooser(stack, chooses, len(batch), per_question, lm.device),
                           stop, renderer, encoded)
    shares = masks[0].shares and masks[0].shares.every(per_question)
    return rows, outputs, shares, stats.add(used)


def stack_encoding(lm: LanguageModel, rows: list[list[Row]], n: int, settings: FusionSettings, encodings: dict,
                   stats: DecodeStats) -> Encoded:
    """The batch's rows (per question: the fused row, then the rows beside it) encoded up to the fused rows'
    answer cue; the fused rows' encoding is made once per batch and encoding (kept in `encodings`), the rows
    beside (plain prompts: no bias, T = 1) for each stack that has them, at their own width."""
    flat = [row for question in rows for row in question]
    shared = shared_prefix_length(flat) if lm.prefix_cache is not None else 0
    width = max(len(row.input_ids) for row in flat)
    key = (settings.encoding(), shared, width)
    if key not in encodings:
        encodings[key] = encode_rows(lm, [question[0] for question in rows], encoder(lm, settings.encoding(), n),
                                     shared, width, stats)
    fused, k = encodings[key], len(rows[0]) - 1
    if not k:
        return fused
    plain = replace(settings.encoding(), bias="none", temperature=1.0)
    plain_rows = [row for question in rows for row in question[1:]]
    own = max(len(row.input_ids) for row in plain_rows)  # encoded at their own width: their padding is not run
    upto = max(shared, fused.length - (width - own))
    if not upto:  # nothing of theirs before the cue to encode, so no K/V to widen
        own, upto = width, fused.length
    beside = encode_rows(lm, plain_rows, encoder(lm, plain, n), shared, own, stats, upto=upto)
    joined = fused.join(beside.widen(width, fused.length, lm.tokenizer.pad_token_id))
    q_rows = len(rows)  # joined: the fused rows, then k rows beside for each question; taken question by question
    return joined.take([i for q in range(q_rows) for i in (q, *(q_rows + q * k + j for j in range(k)))])


def encoder(lm: LanguageModel, settings: FusionSettings, n: int) -> Renderer:
    """The renderer that encodes the paraphrases under `settings` (an encoding: no weights needed)."""
    def render(segment_ids: torch.Tensor, max_new_tokens: int, positions: torch.Tensor | None = None) -> SegmentMask:
        biases = None if settings.bias == "none" else torch.tensor(
            [segment_biases(n, settings.bias)] * len(segment_ids), device=segment_ids.device)
        return SegmentMask(segment_ids, max_new_tokens, settings, biases, lm.model.dtype, paraphrases=n,
                           positions=positions)
    return render


def stack_biases(stack: list[FusionSettings], batch: list[Record], n: int, weights: list[Weights | None],
                 per_question: int, device) -> torch.Tensor | None:
    """[rows, N] score biases of the stack's rows (a variant without a bias: 0; the plain rows beside: 0), or
    None when no variant has a bias."""
    each = [fusion_biases(v, batch, n, w, device) for v, w in zip(stack, weights)]
    if all(b is None for b in each):
        return None
    zeros = torch.zeros(len(batch), n, device=device)
    each = [zeros if b is None else b for b in each]
    if per_question > 1:  # the plain rows beside get none
        each = [torch.cat([b[:, None], b.new_zeros(len(batch), per_question - 1, n)], 1).flatten(0, 1) for b in each]
    return torch.cat(each)


def stack_chooser(stack: list[FusionSettings], chooses: list[Chooser], questions: int, per_question: int,
                  device) -> Chooser:
    """Each variant's chooser on its own questions (variant v's are the decode's [v * Q, (v + 1) * Q)), once the
    rows beside are combined with the fused row by the variant's weight."""
    weight = torch.tensor([v.beside_weight for v in stack], device=device).repeat_interleave(questions)[:, None]

    def choose(logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        if per_question > 1:
            logits = combine_beside(logits, stack[0].beside, weight[live])[:, None]
        tokens = torch.empty(len(live), dtype=torch.long, device=logits.device)
        variant = torch.div(live, questions, rounding_mode="floor")
        for v in variant.unique().tolist():
            chosen = variant == v
            tokens[chosen] = chooses[v](logits[chosen], live[chosen] - v * questions)
        return tokens
    return choose


def decode_fused_shares(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                        settings: FusionSettings, weights: Weights | None = None, choose: Chooser = greedy
                        ) -> tuple[list[list[Row]], list[list[int]], DecodeStats, AttentionShares | None]:
    """`decode_fusions` of one variant: (rows per question: the fused row, then the rows beside it; generated
    tokens; decode statistics; the attention shares when settings.record_attention, else None)."""
    [(rows, outputs, shares)], stats = decode_fusions(lm, dataset, batch, n, stop, [settings], [weights], [choose])
    return rows, outputs, stats, shares


def decode_fused(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                 settings: FusionSettings, weights: Weights | None = None,
                 choose: Chooser = greedy) -> tuple[list[Row], list[list[int]], DecodeStats]:
    """`decode_fused_shares` without the shares and the rows beside: (fused rows, generated tokens, stats)."""
    rows, outputs, stats, _ = decode_fused_shares(lm, dataset, batch, n, stop, settings, weights, choose)
    return [question[0] for question in rows], outputs, stats


def answer_fusions(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                   variants: list[FusionSettings], weights: list[Weights | None]
                   ) -> tuple[list[list[dict]], DecodeStats]:
    """One fused row per question for each variant, decoded together (`decode_fusions`): (result rows per
    variant, decode statistics). A row's `seconds` is its share of the time of them all; its token counts
    are what the variant costs alone. With settings.record_attention each row has `attention_share` (per
    generated token: prefix, paraphrases 1..N, suffix and generated tokens; N+2 shares summing to 1)."""
    start, encodings, weights = time.perf_counter(), {}, list(weights)
    first_pass = [v.bias == "shares" and w is None for v, w in zip(variants, weights)]
    for i, needed in enumerate(first_pass):  # computed here to be kept in the rows; its prompt tokens counted
        if needed:
            weights[i] = share_weights(lm, dataset, batch, n, stop, variants[i], encodings)
    recorders = [Recorder(greedy) for _ in variants]  # the fused row's distribution (with the rows beside)
    results, stats = decode_fusions(lm, dataset, batch, n, stop, variants, weights, recorders, encodings)
    seconds = (time.perf_counter() - start) / (len(batch) * len(variants))
    return [fused_results(lm, batch, n, settings, result, recorder, w, seconds, extra)
            for settings, result, recorder, w, extra in zip(variants, results, recorders, weights, first_pass)], stats


def fused_results(lm: LanguageModel, batch: list[Record], n: int, settings: FusionSettings, result: tuple,
                  recorder: Recorder, weights: Weights | None, seconds: float, first_pass: bool) -> list[dict]:
    """One variant's result rows from its decode (`decode_fusions`' per variant result)."""
    rows, outputs, shares = result

    def cost(row: list[Row], tokens: list[int]) -> dict:
        counts = token_counts(row, tokens)
        counts["prompt_tokens"] += token_counts(row[:1], [])["prompt_tokens"] if first_pass else 0
        return counts
    return [result_row(record, lm.tokenizer, tokens, paraphrases=record.paraphrases[:n],
                       prompts=[lm.tokenizer.decode(row[0].input_ids)], seconds=seconds, method="flex_attention",
                       num_ensemble=n, **settings.row_fields(), **cost(row, tokens), **recorder.fields(b),
                       **(dict(zip(("weights", "weights_fallback"), weights[record.uuid])) if weights else {}),
                       **({"attention_share": shares.shares(b)} if shares is not None else {}))
            for b, (record, row, tokens) in enumerate(zip(batch, rows, outputs))]


def answer_fused(lm: LanguageModel, dataset: Dataset, batch: list[Record], n: int, stop: StopRule,
                 settings: FusionSettings = FusionSettings(), weights: Weights | None = None
                 ) -> tuple[list[dict], DecodeStats]:
    """`answer_fusions` of one variant: (result rows, decode statistics)."""
    rows, stats = answer_fusions(lm, dataset, batch, n, stop, [settings], [weights])
    return rows[0], stats


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
    compiled = compile == "on" or (compile == "auto" and device.type == "cuda")  # on the CPU only when asked:
    # inductor's CPU kernels compile (docs/compile.md) but take 15-45 s a graph, and sdpa is faster there
    return backend, compiled, f"flex ({'compiled' if compiled else 'eager'}){why}{_cpu_compile_warning(compiled, device)}"


def _cpu_compile_warning(compiled: bool, device: torch.device) -> str:
    """Compiled flex gave wrong logits on a CPU without AVX-512 (docs/compile.md): said where the run prints
    its backend, not refused, as which CPU feature decides it is not established."""
    if not compiled or device.type != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return ""
    return ("; WARNING: this CPU has no AVX-512, where compiled flex gave wrong logits (docs/compile.md): "
            "prefer --compile off or --attn sdpa")
