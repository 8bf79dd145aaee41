"""Shared fixtures: tiny random models (no download) and a small hand-made dataset."""
from __future__ import annotations

import functools

import pytest

from dataset import Dataset, Record
from models import tiny_model

QUESTIONS = [
    Record("q1", ["what is the capital of france?", "which city is france's capital?", "france's capital is?"], ["Paris"]),
    Record("q2", ["who wrote hamlet?", "hamlet was written by whom?", "the author of hamlet is?"], ["Shakespeare"]),
    Record("q3", ["where is the eiffel tower?", "the eiffel tower stands in which city?", "eiffel tower location?"], ["Paris"]),
]
FEW_SHOT = [("what color is the sky?", "blue"), ("how many legs does a cat have?", "four")]


@functools.lru_cache(maxsize=None)
def cached_tiny(family: str):
    return tiny_model(family)


@pytest.fixture(params=["llama", "qwen2", "gemma3"])
def tiny(request):
    """(model, tokenizer) of each family: Llama and Gemma 3 add a BOS, Qwen2 does not; all use GQA; Gemma 3
    interleaves sliding-window layers (a 16-token window: every prompt here runs past it) with full ones."""
    return cached_tiny(request.param)


@pytest.fixture
def llama():
    return cached_tiny("llama")


@pytest.fixture
def small_dataset() -> Dataset:
    return Dataset("test", "qa", [Record(r.uuid, list(r.paraphrases), list(r.answers)) for r in QUESTIONS], FEW_SHOT)


def generate_reference(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one prompt, stopping only at max_new_tokens."""
    import torch
    ids = torch.tensor([input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------- the commands in this process

def run_main(script: str, *args: str, env: dict[str, str | None] | None = None, cwd=None,
             input: str | None = None):
    """`python script args` run in this process, through the script's `main(argv)` (what `__main__` calls):
    a subprocess.CompletedProcess with its exit code and what it wrote to stdout and stderr, as a fresh process
    would (its log lines, transformers' own and its warnings on stderr). Torch and the libraries are imported
    once, not once per command; for what only a process shows (signals, kills, its environment read at import,
    several processes) the tests keep subprocesses. `env` holds changes only (None unsets): those read at import
    are followed where they are read (HF_HUB_OFFLINE, SELF_ENSEMBLE_CACHE). Everything the command changes in
    this process is put back: the environment, torch's thread count (OMP_NUM_THREADS followed), sys.argv/stdin, the working folder (REPO_DIR while it runs, as
    the tests' subprocesses had), logging, warnings filters, transformers' progress bar, torch's RNG."""
    import contextlib
    import importlib
    import io
    import logging
    import os
    import subprocess
    import sys
    import traceback
    import warnings
    from pathlib import Path

    import torch
    import transformers

    from cli import PrintableFormatter
    from constants import REPO_DIR

    path = Path(REPO_DIR) / script  # a name in the repo (generate.py) or a path (benchmarks/gpu_check.py)
    module = sys.modules.get(path.stem)
    if getattr(module, "__file__", None) != str(path):
        if path.parent == Path(REPO_DIR):
            module = importlib.import_module(path.stem)
        else:  # a script of another folder, imported as `python path` would run it (that folder first on sys.path)
            import importlib.util
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module  # its dataclasses look themselves up there
            spec.loader.exec_module(module)
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (env or {}).items():
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
            follow_environment(mp, name, value)
        mp.setattr(sys, "argv", [str(path), *argv])
        mp.setattr(sys, "stdin", io.StringIO(input or ""))
        mp.chdir(cwd or REPO_DIR)
        root, library = logging.getLogger(), logging.getLogger("transformers")
        handlers, level = list(root.handlers), root.level
        streams = [(h, h.stream) for h in library.handlers if type(h) is logging.StreamHandler]  # not pytest's
        to_err = logging.StreamHandler(err)
        to_err.setFormatter(PrintableFormatter("%(message)s"))
        root.addHandler(to_err)
        root.setLevel(logging.WARNING)  # a fresh process: cli.main_guard's basicConfig
        for handler, _ in streams:
            handler.setStream(err)
        bar = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.enable_progress_bar()  # as in a fresh process (an earlier run may have hidden it)
        threads = torch.get_num_threads()
        if (env or {}).get("OMP_NUM_THREADS"):  # torch reads it at import: a fresh process would run this many
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                    warnings.catch_warnings(record=True) as caught, torch.random.fork_rng(devices=[]):
                warnings.resetwarnings()  # Python's own filters, not pytest's (pytest.ini's ignores are not a process's)
                for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", category)
                try:
                    code = module.main(argv)
                except SystemExit as done:
                    code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
                    if not isinstance(done.code, (int, type(None))):
                        print(done.code, file=sys.stderr)
                except Exception:  # noqa: BLE001 - what the process would print before exit code 1
                    traceback.print_exc()
                    code = 1
                for w in caught:
                    err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
        finally:
            torch.set_num_threads(threads)
            root.handlers[:] = handlers
            root.setLevel(level)
            for handler, stream in streams:
                handler.setStream(stream)
            if bar:
                transformers.utils.logging.enable_progress_bar()
            else:
                transformers.utils.logging.disable_progress_bar()
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def follow_environment(mp: pytest.MonkeyPatch, name: str, value: str | None) -> None:
    """An environment variable the libraries or the project read at import, set where they keep what they read."""
    import sys
    from pathlib import Path
    if name == "HF_HUB_OFFLINE":
        offline = (value or "").upper() in {"1", "ON", "YES", "TRUE"}
        import huggingface_hub.constants
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        if "datasets" in sys.modules:
            mp.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", offline)
    elif name == "SELF_ENSEMBLE_CACHE":
        import constants
        folder = Path(value or Path.home() / ".cache" / "self-ensemble")
        default = constants.CACHE_DIR
        for module in list(sys.modules.values()):
            if str(getattr(module, "__file__", None)).startswith(str(constants.REPO_DIR)) and getattr(
                    module, "CACHE_DIR", None) is default:
                mp.setattr(module, "CACHE_DIR", folder)
