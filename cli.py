"""The command-line layer the commands share: their flags, parsing (upstream's --indexs), the checks of
every flag before anything is read or loaded, --lemmaize, and turning the parsed flags into the library's
objects (runner.RunConfig, fusion.FusionSettings). Library modules never see an argparse Namespace."""
from __future__ import annotations

import os
import sys

LOADING_INTERRUPTED = "interrupted while the modules were loading; nothing was read or written"


def interrupted_while_loading(kind, value, traceback, previous=sys.excepthook) -> None:
    """sys.excepthook while a command imports its modules (before main_guard runs): Ctrl-C there is one line and
    exit code 130, not a traceback of the import chain; any other exception goes to the previous hook."""
    if not issubclass(kind, KeyboardInterrupt):
        return previous(kind, value, traceback)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(LOADING_INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)  # the interpreter would exit 1 (or by SIGINT) after its hook; nothing is open yet


sys.excepthook = interrupted_while_loading  # first, before the heavy imports below (torch, transformers)

import argparse
import errno
import io
import logging
import math
import signal
from pathlib import Path
from typing import Callable

from constants import (DATASETS, DEFAULT_CONFIDENCE_SAMPLES, DEFAULT_DATASET, DEFAULT_FEWSHOT_FORMAT,
                       DEFAULT_FUSION_BIAS, DEFAULT_FUSION_TEMPERATURE, DEFAULT_MAX_NEW_TOKENS,
                       DEFAULT_NUM_PARAPHRASES, DEFAULT_PARAPHRASE_TEMPERATURE, DEFAULT_PARAPHRASE_TOP_P,
                       DEFAULT_POSITIONS, DEFAULT_SC_TEMPERATURE, DEFAULT_SC_TOP_P, EMBEDDED_MODEL, EXIT_BAD_INPUT,
                       SC_PROMPTS, InputError)
from dataset import FEWSHOT_FORMATS, PROMPT_FORMATS
from fusion import BESIDE, FUSION_BIASES, ISOLATIONS, POSITIONS, FusionSettings
from files import printable
from runner import Interrupted, RunConfig
from selection import Selection

MAX_SEED = 2 ** 63 - 1  # torch.manual_seed and numpy take seeds below 2^63 (and 2^64): one range for all
EXIT_FAULT = 1          # an OS error (disk full, read-only, I/O): one line, partial rows kept


class Done(Exception):
    """The command's work is finished before a model was needed (--lemmaize); main_guard exits with code 0
    after printing the message."""


class OneLineParser(argparse.ArgumentParser):
    """The scripts' argparse: a bad flag is reported in one line (naming --help) with exit code 2, like
    every other bad input, instead of the usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see --help)\n")


def paraphrase_indexs(text: str) -> str:
    """--indexs as upstream spells it: comma-separated paraphrase indices, 0 being the original question."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated paraphrase indices such as 0,2,4, got {text!r}")
    indices = [int(part) for part in parts]
    if len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"{text!r} names a paraphrase twice")
    return ",".join(map(str, indices))


def finite_float(text: str) -> float:
    """A float flag: a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


N_FLAGS = ("num_ensemble", "num_paraphrases")  # both commands take both names of N


class CommonParser(OneLineParser):
    """--indexs decides N (upstream: it replaces --num_ensemble): set it, and refuse a different N given with it."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        indexs = [int(i) for i in ns.indexs.split(",")] if getattr(ns, "indexs", None) else None
        if indexs and getattr(ns, "num", None) is not None and ns.num != len(indexs):
            self.error(f"--indexs {ns.indexs} chooses {len(indexs)} paraphrases but N (--num_ensemble / "
                       f"--num_paraphrases) is {ns.num}; give one of them")
        if indexs:
            ns.num = len(indexs)
        return ns, rest


def common_flags() -> list[tuple[tuple[str, ...], dict]]:
    """The flags both commands share, as (names, add_argument keywords)."""
    return [
        (("--dataset",), dict(default=DEFAULT_DATASET, choices=DATASETS)),
        (("--data-file", "--data_file"), dict(help="local data: JSONL for jsonl/webqa_sample/myriadlama, "
                                              "WebQuestions JSON, or a datasets save_to_disk folder")),
        (("--task",), dict(choices=["qa", "mask"], help="prompt style for --dataset jsonl (default qa)")),
        (("--model",), dict(default=EMBEDDED_MODEL, help="a model key, Hugging Face id or local folder")),
        (("--limit", "--max-samples", "--max_samples"), dict(
            dest="limit", type=int, help="answer only the first LIMIT questions (--max_samples: upstream's name)")),
        (("--half",), dict(choices=["choose", "confirm"], help="jsonl: only the questions of this half of the "
                                                               "study's protocol (their 'half' field)")),
        (("--batch-size", "--batch_size"), dict(type=int, default=8, help="questions per batch")),
        (("--max-new-tokens", "--max_new_tokens"), dict(type=int, default=DEFAULT_MAX_NEW_TOKENS)),
        (("--device",), dict(default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")),
        (("--dtype",), dict(default="auto", choices=["auto", "float32", "bfloat16", "float16"])),
        (("--device-map", "--device_map"), dict(help="'auto' spreads one large model over several GPUs")),
        (("--output-dir", "--output_dir"), dict(help="default results/<dataset>/<model>/")),
        (("--seed",), dict(type=int, default=0)),
        (("--no-progress",), dict(action="store_true", help="no progress bar")),
        (("--paraphrase-temperature",), dict(type=finite_float, default=DEFAULT_PARAPHRASE_TEMPERATURE,
                                             help="webqa: sampling temperature of paraphrasing")),
        (("--paraphrase-top-p",), dict(type=finite_float, default=DEFAULT_PARAPHRASE_TOP_P,
                                       help="webqa: top-p of paraphrasing")),
        (("--paraphrases",), dict(metavar="SET", help="myriadlama: templates per fact: manual, manual+autoK "
                                  "(K auto templates drawn per fact as upstream) or all (default manual+auto5)")),
        (("--no-prefix-cache",), dict(action="store_true", help="encode the shared prefix in every batch instead "
                                      "of once per run (the reference)")),
        (("--prompt-format",), dict(choices=PROMPT_FORMATS, default="plain", help="chat: the tokenizer's chat "
                                    "template writes the prompt (instruction as the system turn, few-shot examples "
                                    "as turns, the question last); plain: Q:/A: text")),
        (("--indexs",), dict(type=paraphrase_indexs, metavar="I,J,...", help="upstream's diversity runs: fuse "
                             "exactly these paraphrases (0 = the original question; N is their count); the table "
                             "goes to <output-dir>/diversity/<name>-<indexs>.feather")),
        (("--num-fewshot", "--num_fewshot"), dict(type=int, metavar="K", help="few-shot examples in the prompt (default "
                                                   "5, upstream's; 0: none)")),
        (("--lemmaize",), dict(action="store_true", help="generate nothing: add upstream's lemma columns "
                               "(predict_lemma, answer_lemmas) to the table this command names, rewriting it "
                               "atomically (a no-op when they are there)")),
    ]


def common_parser(description: str, omit: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A parser with the shared flags, less those whose first name is in `omit` (a tool offers only the
    flags it uses)."""
    p = CommonParser(description=description)
    for names, kwargs in common_flags():
        if names[0] not in omit:
            p.add_argument(*names, **kwargs)
    return p


def add_n_flag(p: argparse.ArgumentParser, help: str) -> None:
    """N, under both commands' names (generate.py's --num_ensemble, upstream's --num_paraphrases)."""
    p.add_argument("--num-paraphrases", "--num_paraphrases", "--num-ensemble", "--num_ensemble", dest="num",
                   type=int, help=help)


def add_selection_flags(p: argparse.ArgumentParser) -> None:
    """Which paraphrases each question is asked with (selection.Selection): upstream's synced samples and the
    manual/auto mix."""
    p.add_argument("--num-samples", "--num_samples", type=int, metavar="S",
                   help="S ordered selections of N paraphrases per question, as upstream draws them "
                        "(syncedsample_... tables); with --num_manual/--num_auto: N itself, drawn from M + A")
    p.add_argument("--repeat-paras", "--repeat_paras", action="store_true",
                   help="with --num_samples: each selection is one paraphrase N times (the count without diversity)")
    p.add_argument("--num-manual", "--num_manual", type=int, metavar="M", help="MyriadLAMA mix: M manual templates")
    p.add_argument("--num-auto", "--num_auto", type=int, metavar="A", help="MyriadLAMA mix: A automatic templates")


def selection(args: argparse.Namespace) -> Selection | None:
    """The sampled selection the flags ask for, or None (the first N paraphrases, or --indexs)."""
    mix = args.num_manual is not None or args.num_auto is not None
    if args.num_samples is None:
        if mix or args.repeat_paras:
            raise InputError("--repeat_paras, --num_manual and --num_auto need --num_samples")
        return None
    if args.indexs:
        raise InputError("--indexs chooses the paraphrases itself; drop it or --num_samples")
    return Selection(args.num_samples, args.repeat_paras, args.num_manual if mix else None,
                     args.num_auto if mix else None)


def add_fusion_flags(p: argparse.ArgumentParser, compile_flag: bool = True) -> None:
    """The attention-level flags of flex_attention_generate.py and debug_flexattention.py (FusionSettings)."""
    p.add_argument("--positions", choices=[*POSITIONS, "aligned"], default=DEFAULT_POSITIONS,
                   help="left (alias aligned): every paraphrase starts after the prefix; right: every paraphrase "
                        "ends before the answer cue; continuous: 0..L-1 (upstream)")
    p.add_argument("--attn", choices=["auto", "flex", "sdpa"], default="auto",
                   help="flex: FlexAttention BlockMask; sdpa: the same mask dense (reference backend); auto: flex "
                        "on CUDA, sdpa on CPU")
    p.add_argument("--fusion-bias", default=DEFAULT_FUSION_BIAS,
                   metavar="{none,uniform,sqrt,confidence,agreement,shares,B}",
                   help="score bias of the answer on paraphrase keys: uniform -log N (keeps N identical copies == that "
                        "prompt alone), sqrt -1/2 log N (the default: chosen on both dev sets, docs/study.md), "
                        "confidence log(weight), "
                        "agreement log(share of the N single answers that agree with the paraphrase's own), shares "
                        "(each paraphrase about the same attention share: log w, w ~ 1/first token's share), or a "
                        "number B added on every paraphrase (log of APE's scale S)")
    p.add_argument("--fusion-temperature", type=finite_float, default=DEFAULT_FUSION_TEMPERATURE,
                   help="the answer's scores on paraphrase keys divided by T (APE); 1: off")
    p.add_argument("--fewshot-format", choices=FEWSHOT_FORMATS, default=DEFAULT_FEWSHOT_FORMAT,
                   help="single: each few-shot example as one question; fused: as its N isolated paraphrases, "
                        "then its answer (the same shape as the question)")
    p.add_argument("--isolation", choices=ISOLATIONS, default="full",
                   help="full: each paraphrase sees the prefix and itself; none: the paraphrases as one plain causal "
                        "sequence (an ablation, upstream's -n; positions as --positions says)")
    p.add_argument("--record-attention", action="store_true",
                   help="keep in each row, per generated token, its attention share on the prefix, each paraphrase "
                        "and the suffix/generated tokens (averaged over heads and layers)")
    p.add_argument("--beside", choices=BESIDE, default="none",
                   help="rows decoded beside the fused one, log-probabilities combined each step: singles (the N "
                        "plain prompts; (1-w) fused + w avg) or prior (the prompt without the question; (1+w) fused "
                        "- w prior, PCED-style contrast)")
    p.add_argument("--beside-weight", type=finite_float, default=0.5, help="w of --beside (default 0.5)")
    p.add_argument("--confidence-samples", type=int, default=DEFAULT_CONFIDENCE_SAMPLES,
                   help="K sampled answers per paraphrase for --fusion-bias confidence (upstream: 100)")
    if compile_flag:
        p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                       help="torch.compile flex_attention (auto: on CUDA only)")


SC_FLAGS = ("sc_samples", "sc_temperature", "sc_top_p", "sc_prompts")


def add_sc_flags(p: argparse.ArgumentParser) -> None:
    """generate.py's self-consistency flags (methods.SelfConsistency); left out, the defaults in constants.py."""
    p.add_argument("--sc-samples", type=int, metavar="K", help="self_consistency: answers sampled per question "
                   "(default N: the vote's N decodes)")
    p.add_argument("--sc-temperature", type=finite_float, metavar="T", help=f"self_consistency: sampling temperature "
                   f"(default {DEFAULT_SC_TEMPERATURE}, Wang et al. 2022)")
    p.add_argument("--sc-top-p", type=finite_float, metavar="P", help=f"self_consistency: nucleus top-p in (0, 1] "
                   f"(default {DEFAULT_SC_TOP_P:g}: no truncation)")
    p.add_argument("--sc-prompts", choices=SC_PROMPTS, help="self_consistency: first (every sample reads the first "
                   "paraphrase, the default) or each (sample k reads paraphrase k mod N)")


def self_consistency_settings(args: argparse.Namespace):
    """methods.SelfConsistency from the flags for --method self_consistency (None for the other methods, which
    refuse the flags); bad values end in one line before anything loads."""
    given = [f"--{f.replace('_', '-')}" for f in SC_FLAGS if getattr(args, f, None) is not None]
    if args.method != "self_consistency":
        if given:
            raise InputError(f"{given[0]} applies to --method self_consistency only")
        return None
    from methods import SelfConsistency
    chosen = {k: v for k, v in zip(("samples", "temperature", "top_p", "prompts"),
                                   (getattr(args, f) for f in SC_FLAGS)) if v is not None}
    return SelfConsistency(**chosen, seed=args.seed)


def check_flags(args: argparse.Namespace) -> None:
    """Every flag on its own and together, before anything is read or loaded."""
    from models import check_device_map, check_model_name, resolve_device
    for flag in ("batch_size", "max_new_tokens", "limit", "confidence_samples", "num", "top_k", "num_samples",
                 "samples"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            name = "N (--num-paraphrases, --num-ensemble)" if flag == "num" else f"--{flag.replace('_', '-')}"
            raise InputError(f"{name} must be at least 1, got {value}")
    if getattr(args, "num_fewshot", None) is not None and args.num_fewshot < 0:
        raise InputError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    if not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed must be in [0, 2^63 - 1], got {args.seed}")
    if args.paraphrase_temperature <= 0 or not 0 < args.paraphrase_top_p <= 1:
        raise InputError("--paraphrase-temperature must be > 0 and --paraphrase-top-p in (0, 1]")
    if getattr(args, "fusion_temperature", 1.0) <= 0:
        raise InputError(f"--fusion-temperature must be > 0, got {args.fusion_temperature}")
    if getattr(args, "output_dir", None) is not None and not args.output_dir.strip():
        raise InputError("--output-dir '': give a folder (or leave the flag out for results/<dataset>/<model>/)")
    resolve_device(args.device)
    check_device_map(getattr(args, "device_map", None))
    check_model_name(args.model)
    check_magnitudes(args)


# How each numeric flag enters the model's arithmetic: added to scores or log-probabilities (|v| bounded), a
# temperature that scores are divided by (bounded above and away from 0), or a probability (not below the
# dtype's smallest normal number, where it would round to 0).
ADDED_FLAGS = ("fusion_bias", "beside_weight")
DIVIDING_FLAGS = ("fusion_temperature", "sc_temperature", "paraphrase_temperature")
PROBABILITY_FLAGS = ("sc_top_p", "paraphrase_top_p")


def check_magnitudes(args: argparse.Namespace) -> None:
    """Finite numbers can still overflow the model's dtype (--fusion-bias 1e300 is inf in float32, and every answer
    empty; --fusion-temperature 1e-300 is 0): each numeric flag is bounded by what its dtype computes, sqrt of its
    largest number (so that a score times or plus the value stays finite), one line naming the flag and bound."""
    import torch

    from models import resolve_device, resolve_dtype
    dtype = resolve_dtype(getattr(args, "dtype", "auto"), resolve_device(args.device))
    info, name = torch.finfo(dtype), str(dtype).removeprefix("torch.")
    bound = math.sqrt(info.max)
    for flag in (*ADDED_FLAGS, *DIVIDING_FLAGS, *PROBABILITY_FLAGS):
        value = flag_number(args, flag)
        if value is None:
            continue
        spelled = f"--{flag.replace('_', '-')} {value:g}"
        if flag in ADDED_FLAGS and abs(value) > bound:
            raise InputError(f"{spelled}: a {name} model cannot compute it; give a value within +-{bound:.3g}")
        if flag in DIVIDING_FLAGS and value > 0 and not 1 / bound <= value <= bound:
            raise InputError(f"{spelled}: a {name} model cannot compute it; give a value in [{1 / bound:.3g}, "
                             f"{bound:.3g}]")
        if flag in PROBABILITY_FLAGS and 0 < value < info.tiny:
            raise InputError(f"{spelled}: rounds to 0 in {name}; give at least {info.tiny:.3g}")


def flag_number(args: argparse.Namespace, flag: str) -> float | None:
    """The flag's value as a number, or None (absent, or a named --fusion-bias such as sqrt)."""
    value = getattr(args, flag, None)
    if value is None or (flag == "fusion_bias" and value in FUSION_BIASES):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None  # FusionSettings names what a bad --fusion-bias is (and a non-finite one)
    return number if math.isfinite(number) else None


COMMON_FLAGS = ("dataset", "data_file", "task", "model", "limit", "half", "batch_size", "max_new_tokens", "device",
                "dtype", "device_map", "output_dir", "seed", "no_progress", "paraphrase_temperature", "paraphrase_top_p",
                "paraphrases", "no_prefix_cache", "prompt_format", "indexs", "num_fewshot")
NOT_ANSWER_FLAGS = ("lemmaize", "num", "top_k", "verbose")  # never part of a table's settings as flags


def run_config(args: argparse.Namespace, **method_flags) -> RunConfig:
    """The job's configuration from the parsed flags; `method_flags`: the command's flags that change its
    answers, as its table's settings keep them (e.g. method and num_ensemble)."""
    defaults = RunConfig()
    common = {k: getattr(args, k, getattr(defaults, k, False)) for k in COMMON_FLAGS}
    common["progress"] = not common.pop("no_progress")
    common["prefix_cache"] = not common.pop("no_prefix_cache")
    chosen = selection(args) if hasattr(args, "num_samples") else None
    return RunConfig(**common, selection=chosen, method_flags=method_flags)


def fusion_settings(args: argparse.Namespace, device) -> tuple[FusionSettings, str]:
    """The attention-level settings from the flags, the backend resolved for `device` (nothing falls back),
    and the backend as the user is told it (with the reason, for --attn auto)."""
    from methods import resolve_backend
    backend, compiled, label = resolve_backend(args.attn, getattr(args, "compile", "off"), device,
                                               getattr(args, "device_map", None))
    settings = FusionSettings(args.positions, args.fusion_bias, args.fusion_temperature, args.fewshot_format, backend,
                              compiled, args.isolation, args.record_attention, args.beside, args.beside_weight)
    return settings, label


def main_guard(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Bad input ends the program with one line on stderr and exit code 2; an OS error (disk full, a
    read-only folder) with one line and exit code 1; Ctrl-C and SIGTERM with one line and 130 / 143,
    the finished questions kept for a rerun. Never a traceback."""
    def guarded(argv: list[str] | None = None) -> int:
        handler = logging.StreamHandler()
        handler.setFormatter(PrintableFormatter("%(message)s"))
        logging.basicConfig(level=logging.WARNING, handlers=[handler])
        previous = signal.signal(signal.SIGTERM, raise_terminated)
        stdout = sys.stdout
        sys.stdout = PipeSafe(stdout)  # a closed stdout (| head -n 1) never stops or fails a run
        try:
            return main(argv)
        except Done as done:
            print(printable(str(done)))
            return 0
        except InputError as err:
            return say(f"error: {err}", EXIT_BAD_INPUT)
        except Interrupted as err:
            return say(f"interrupted: {err}", err.code)
        except (KeyboardInterrupt, Terminated) as err:
            code = 143 if isinstance(err, Terminated) else 130
            return say("interrupted before any question was answered; nothing was written", code)
        except OSError as err:
            where = f"{err.filename}: " if getattr(err, "filename", None) else ""
            return say(f"error: {where}{err.strerror or err}", EXIT_FAULT)
        finally:
            signal.signal(signal.SIGTERM, previous)
            sys.stdout.flush()
            if isinstance(sys.stdout, PipeSafe):
                sys.stdout = stdout
    return guarded


class PipeSafe(io.TextIOBase):
    """stdout that a closed or full reader cannot break: on EPIPE (the reader left: | head -n 1) the rest of the
    output goes to /dev/null quietly, on ENOSPC (a full disk) too, after one line on stderr; so a finished run
    still exits 0 and an unfinished one goes on (its table is what it is for)."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def write(self, text: str) -> int:
        self.attempt(lambda: self.stream.write(text))
        return len(text)

    def flush(self) -> None:
        self.attempt(self.stream.flush)

    def attempt(self, call: Callable[[], object]) -> None:
        if self.gone:
            return
        try:
            call()
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.ENOSPC):
                raise
            if err.errno == errno.ENOSPC:
                say(f"warning: stdout is full ({err.strerror}); the rest of this command's output is dropped", 0)
            self.drop_the_rest()

    def drop_the_rest(self) -> None:
        """What is still buffered, and the interpreter's last flush, go to /dev/null."""
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class PrintableFormatter(logging.Formatter):
    """Log lines through `printable`, line by line (a path or uuid in a warning holds no escape codes)."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run stops where Ctrl-C would."""


def raise_terminated(signum, frame) -> None:
    raise Terminated()


def say(line: str, code: int) -> int:
    """One line on stderr: whitespace collapsed, control characters escaped (`printable`)."""
    print(printable(" ".join(str(line).split())), file=sys.stderr)
    return code


def lemmaize_command(config: RunConfig, table: Path | None) -> None:
    """--lemmaize: upstream's separate mode. The table the same command without --lemmaize wrote gets the lemma
    columns; nothing is generated and no model is loaded. Ends with Done (exit code 0)."""
    from results import TableLock, lemmaize_table
    if table is None:
        raise InputError("--lemmaize adds lemma columns to a result table; this command writes none")
    path = config.table_path(table)
    if not path.exists():
        raise InputError(f"--lemmaize: no table {path}; run the same command without --lemmaize first")
    with TableLock(path):
        added = lemmaize_table(path)
    raise Done(f"{path}: lemma columns {'added' if added else 'already there, nothing to do'} "
               f"(predict_lemma, answer_lemmas)")


def parse(p: argparse.ArgumentParser, argv: list[str] | None, default_n: int | None = DEFAULT_NUM_PARAPHRASES
          ) -> argparse.Namespace:
    """Parse and check the flags; N (`args.num`) defaults to `default_n` unless --indexs set it."""
    args = p.parse_args(argv)
    if getattr(args, "num_manual", None) is not None and args.num_samples is not None:  # the mix: N is S
        if args.num not in (None, args.num_samples):
            raise InputError(f"--num_manual/--num_auto draw N = --num_samples {args.num_samples} paraphrases; "
                             f"drop --num_paraphrases {args.num}")
        args.num = args.num_samples
    if getattr(args, "num", "absent") is None:
        args.num = default_n
    check_flags(args)
    return args
