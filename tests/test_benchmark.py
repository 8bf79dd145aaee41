"""Smoke test of benchmarks/bench_ensemble.py: `--quick --model tiny-llama` (its main, in this process); every method
is in the table and the work counts are what each algorithm implies. No timing is asserted."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from conftest import run_main

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_ensemble.py"
MAX_NEW, N, QUESTIONS = 4, 3, 2
METHODS = {"single_generate", "upstream_nocache", "logit_avg", "attn_sdpa", "attn_flex"}


def write_data(path: Path) -> None:
    """5 few-shot rows and 3 questions with 4 paraphrases each (fewer than the N=6 and N=50 of the sweep)."""
    rows = [{"uuid": f"t{i}", "paraphrases": [f"train question {i}?"], "answers": [f"a{i}"], "split": "train"}
            for i in range(5)]
    for i, (q, a) in enumerate([("what is the capital of france?", "Paris"), ("who wrote hamlet?", "Shakespeare"),
                                ("where is the eiffel tower?", "Paris")]):
        rows.append({"uuid": f"q{i}", "paraphrases": [q, f"tell me: {q}", f"question: {q}", f"{q} please"],
                     "answers": [a]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    data, out = tmp / "data.jsonl", tmp / "out"
    write_data(data)
    cmd = [str(BENCH), "--quick", "--model", "tiny-llama", "--dataset", "jsonl", "--data-file", str(data),
           "--questions", str(QUESTIONS), "--n", str(N), "--sweep-n", "1,6,50", "--large-batch", "2",
           "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--no-compile", "--output-dir", str(out)]
    proc = run_main(*cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "bench_ensemble.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    return proc.stdout, rows, out


def num(row: dict, key: str) -> float:
    return float(row[key])


def test_table_has_every_method_and_the_sweeps(bench_run):
    stdout, rows, out = bench_run
    assert METHODS == {r["method"] for r in rows.values()}  # compiled flex: off on CPU (--no-compile)
    assert {"logit_avg_bs2", "attn_sdpa_bs2", "logit_avg_n1", "attn_sdpa_n6", "logit_avg_n6", "logit_avg_noprefix",
            "attn_sdpa_noprefix", "logit_avg_bs2_noprefix", "attn_sdpa_bs2_noprefix"} <= set(rows)
    for name, row in rows.items():  # every method that should run did
        assert row["status"] == "ok", row
        assert num(row, "s_per_q") > 0 and num(row, "peak_rss_mb") > 0
    assert f"exactly {MAX_NEW} new tokens" in stdout
    assert "N=6" in stdout and "cyclically" in stdout  # 4 paraphrases stored, N=6 repeats them
    assert {"logit_avg_n50", "attn_sdpa_n50"} <= set(rows)
    for name in ("single_generate", "upstream_nocache", "logit_avg", "attn_sdpa"):
        assert name in stdout
    assert (out / "bench_ensemble.md").read_text().count("| upstream_nocache |") == 1
    # the ratios the README's targets are read against, with no verdict: the targets are not in the code
    ratios = json.loads((out / "bench_ensemble.json").read_text())["ratios"]
    assert any(line.startswith("attn_sdpa [median]: ") and "faster than (2)" in line for line in ratios)
    assert "batch 2: " in " ".join(ratios) and "MET" not in stdout and "MISSED" not in stdout


def test_every_method_decodes_the_same_number_of_tokens(bench_run):
    _, rows, _ = bench_run
    for name, row in rows.items():
        if row["status"] == "ok":
            assert num(row, "steps") == MAX_NEW - 1, name  # the first token comes from the prefill


def test_upstream_reruns_everything_and_ours_does_not(bench_run):
    _, rows, _ = bench_run
    up, logit, attn, single = (rows[k] for k in ("upstream_nocache", "logit_avg", "attn_sdpa", "single_generate"))
    # upstream: N forwards per new token, each over the whole sequence so far (no cache)
    assert num(up, "forwards_per_q") == N * MAX_NEW
    prompts = num(up, "prefill_tok_per_q")  # the N prompts, unpadded
    assert num(up, "decode_tok_per_q") == (MAX_NEW - 1) * prompts + N * MAX_NEW * (MAX_NEW - 1) / 2
    # ours: one forward per new token for the whole question, one token per row per step
    for row in (logit, attn, single):
        assert num(row, "forwards_per_q") == MAX_NEW
    assert num(logit, "decode_tok_per_q") == N * (MAX_NEW - 1)
    assert num(attn, "decode_tok_per_q") == MAX_NEW - 1
    assert num(single, "decode_tok_per_q") == MAX_NEW - 1
    # without the prefix cache: the same N prompts, left padded to the longest; the fused row holds the
    # shared prefix and suffix once, so fewer tokens than N separate prompts
    logit_fresh, attn_fresh = (num(rows[k], "prefill_tok_per_q") for k in ("logit_avg_noprefix", "attn_sdpa_noprefix"))
    assert logit_fresh >= prompts
    assert num(single, "prefill_tok_per_q") < attn_fresh < prompts
    # with it, the prefix is run once per run (in the warm-up): each of the N rows saves exactly its P tokens
    saved = attn_fresh - num(attn, "prefill_tok_per_q")
    assert saved > 20 and logit_fresh - num(logit, "prefill_tok_per_q") == N * saved
    for case in ("logit_avg", "attn_sdpa"):  # and nothing else changes: same tokens (the table says so)
        assert rows[f"{case}_noprefix"]["same_tokens_as"] == f"{QUESTIONS}/{QUESTIONS} = {case}"
    total = {k: num(rows[k], "tok_per_q") for k in ("upstream_nocache", "logit_avg", "attn_sdpa")}
    assert total["upstream_nocache"] > total["logit_avg"] > total["attn_sdpa"]
    # batching: one forward per step for the whole batch
    assert num(rows["logit_avg_bs2"], "forwards_per_q") == MAX_NEW / 2
    # the work grows with N: N padded rows for logit fusion, the paraphrases' own tokens for attention fusion
    assert num(rows["logit_avg_n6"], "prefill_tok_per_q") > 1.9 * num(rows["logit_avg"], "prefill_tok_per_q")
    assert num(rows["attn_sdpa_n6"], "prefill_tok_per_q") < num(rows["logit_avg_n6"], "prefill_tok_per_q")
    assert num(rows["logit_avg_n1"], "decode_tok_per_q") == num(single, "decode_tok_per_q")
    assert num(rows["logit_avg_n1"], "prefill_tok_per_q") == num(single, "prefill_tok_per_q") - saved


def test_n_above_the_stored_paraphrases_cycles_them(bench_run):
    """--sweep-n 50 with 4 paraphrases stored: 50 rows per question for logit fusion, one fused row (of 50
    paraphrases) for attention fusion, and more prompt tokens than at N=6."""
    stdout, rows, _ = bench_run
    assert "N=50 repeats them cyclically (p1..p4, p1, ...)" in stdout
    assert num(rows["logit_avg_n50"], "decode_tok_per_q") == 50 * (MAX_NEW - 1)
    assert num(rows["attn_sdpa_n50"], "decode_tok_per_q") == MAX_NEW - 1
    assert num(rows["attn_sdpa_n50"], "forwards_per_q") == MAX_NEW
    assert num(rows["attn_sdpa_n50"], "prefill_tok_per_q") > 5 * num(rows["attn_sdpa_n6"], "prefill_tok_per_q")


def load_script(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_the_n_sweep_at_a_larger_batch_names_its_cases():
    bench = load_script("bench_ensemble")
    names = [c.name for c in bench.build_cases(bench.parse_args(["--sweep-n", "1,20", "--sweep-batch", "8"]))]
    assert {"logit_avg_bs8_n1", "attn_sdpa_bs8_n1", "logit_avg_bs8_n20", "attn_sdpa_bs8_n20"} <= set(names)
    cases = {c.name: c for c in bench.build_cases(bench.parse_args(["--sweep-n", "1,20", "--sweep-batch", "8"]))}
    assert cases["attn_sdpa_bs8_n20"].batch_size == 8 and cases["attn_sdpa_bs8_n1"].reference is None
    plain = {c.name: c for c in bench.build_cases(bench.parse_args(["--sweep-n", "1,20"]))}
    assert plain["attn_sdpa_n1"].batch_size == 1 and plain["attn_sdpa_n1"].reference == "single_generate"


def test_cost_plot_draws_the_benchmarks_curves(bench_run, tmp_path):
    """benchmarks/plot_cost.py as the README runs it, on the benchmark's JSON: one line per method and batch."""
    _, rows, out = bench_run
    png = tmp_path / "cost.png"
    proc = run_main(str(REPO / "benchmarks" / "plot_cost.py"), str(out / "bench_ensemble.json"), "--output", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.stat().st_size > 20_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot = load_script("plot_cost")
    lines = plot.curves(plot.read_rows(out / "bench_ensemble.json"))
    assert set(lines) == {(m, b, MAX_NEW) for m in ("logit_avg", "attn_sdpa") for b in (1, 2)}
    assert [r["N"] for r in lines[("attn_sdpa", 1, MAX_NEW)]] == [1, N, 6, 50]


def test_step_cost_counts_the_weight_matrices_of_a_token():
    """tiny-llama by hand: per layer q and o 64x64 each, k and v 64x32 each (2 of 4 heads' width), the MLP 3 x 64x128;
    two layers; the output head 64 x the vocabulary."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_cost
    from models import tiny_model
    model, tokenizer = tiny_model("llama")
    costs = step_cost.token_costs(model.config)
    assert costs["layers"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert costs["head"] == 64 * len(tokenizer) and costs["decode step"] == costs["layers"] + costs["head"]
    out = run_main(str(REPO / "benchmarks" / "step_cost.py"), "--model", "tiny-llama", "--model", "tiny-gemma3")
    assert out.returncode == 0 and "| tiny-llama | 0.1 |" in out.stdout and "tiny-gemma3 against tiny-llama" in out.stdout
