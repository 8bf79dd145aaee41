"""The model registry, the tiny test models, and the embedded model's one-time GGUF conversion."""
from __future__ import annotations

import pytest
import torch

import models
from constants import MODELS, InputError

UPSTREAM_KEYS = ["llama3.2_1b", "llama3.2_1b_it", "llama3.2_3b", "llama3.2_3b_it", "llama3.1_8b", "llama3.1_8b_it",
                 "qwen2.5_3b_it", "qwen2.5_7b", "qwen2.5_7b_it", "qwen3_1.7b", "qwen3_4b", "qwen3_8b"]


def test_registry_has_the_upstream_keys_mapped_to_hub_ids():
    assert set(UPSTREAM_KEYS) <= set(MODELS)
    assert MODELS["llama3.2_3b_it"] == "meta-llama/Llama-3.2-3B-Instruct"
    assert MODELS["qwen2.5_7b_it"] == "Qwen/Qwen2.5-7B-Instruct"
    assert models.model_source("qwen3_8b") == "Qwen/Qwen3-8B"
    assert models.model_source("some-org/some-model") == "some-org/some-model"


def test_unknown_model_and_missing_gpu_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a model key"):
        models.model_source("llama9000")
    assert models.model_source(str(tmp_path)) == str(tmp_path)  # a local folder
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            models.resolve_device("cuda")
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_offline_hub_id_fails_with_one_clear_line(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it there too
    with pytest.raises(InputError, match="not-a-model-xyz is not in the hub cache .*HF_HUB_OFFLINE.*download_resources"):
        models.load_model("nobody/not-a-model-xyz", device="cpu")


def test_unreachable_hub_fails_at_once_without_retries(monkeypatch):
    """Not offline by flag, but the hub does not answer: one line after the probe, no download retries."""
    import time

    import dataset
    import huggingface_hub.constants
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dataset, "hub_unreachable", lambda: "https://huggingface.co: no answer")
    start = time.perf_counter()
    with pytest.raises(InputError, match="not in the hub cache .*no answer.*download_resources.sh --model nobody/x"):
        models.load_model("nobody/x", device="cpu")
    assert time.perf_counter() - start < 5


def test_model_names_and_device_maps_are_checked_without_loading(tmp_path):
    for name in ("tiny-llama", "llama3.2_1b", "some-org/some-model"):
        models.check_model_name(name)
    with pytest.raises(InputError, match="not a model key"):
        models.check_model_name("llama9000")
    with pytest.raises(InputError, match="without config.json"):
        models.check_model_name(str(tmp_path))
    for ok in (None, "auto", "balanced", "sequential", "cpu"):
        models.check_device_map(ok)
    with pytest.raises(InputError, match="--device-map 'foo': not one of auto"):
        models.check_device_map("foo")


def test_revision_of_a_local_folder_follows_its_files(tmp_path):
    model, tokenizer = models.tiny_model("llama")
    assert models.model_revision(model) is None  # built by code: nothing to name
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = models.load_model(str(tmp_path), device="cpu")
    first = models.model_revision(loaded)
    assert first.startswith("files:") and first == models.model_revision(loaded)
    (tmp_path / "extra.bin").write_bytes(b"x")
    assert models.model_revision(loaded) != first


def test_tiny_models_take_the_dtype():
    model, _ = models.load_model("tiny-llama", device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_models_are_deterministic_with_gqa(family):
    (a, tok), (b, _) = models.tiny_model(family), models.tiny_model(family)
    assert a.config.num_key_value_heads < a.config.num_attention_heads
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    text = "Q: où est Paris?\nA:"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level round trip
    assert (tok(text)["input_ids"][0] == tok.bos_token_id) == (family == "llama")


@pytest.mark.embedded
def test_embedded_model_is_converted_once_then_reused(tmp_path, monkeypatch):
    calls = []
    convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a: (calls.append(a), convert(*a)))
    cut_short = tmp_path / "models" / "smollm2_135m_it"  # a conversion interrupted after the rename's mkdir
    cut_short.mkdir(parents=True)
    (cut_short / "model.safetensors").write_bytes(b"partial")
    folder = models.embedded_model_dir(tmp_path)
    assert calls and (folder / "config.json").exists() and list(folder.glob("*.safetensors"))
    assert folder == cut_short and (folder / "model.safetensors").stat().st_size > 1_000_000  # replaced
    from results import current_umask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # shared caches: not mkdtemp's 0700
    for file in folder.iterdir():  # the weights as readable as their folder
        assert file.stat().st_mode & 0o777 == 0o666 & ~current_umask(), file.name
    assert models.embedded_model_dir(tmp_path) == folder and len(calls) == 1  # second load: no conversion
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    model, tokenizer = models.load_model("smollm2_135m_it", device="cpu")
    assert len(calls) == 1 and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
