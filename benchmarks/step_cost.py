"""What one token costs each model, counted from its config (multiply-accumulates of the weight matrices; the
attention scores, which grow with the context, aside): the decoder layers and the output head, at prefill
(the head runs for the last prompt token only) and per decode step (the head runs for every row).

    python benchmarks/step_cost.py                       # the two packaged models
    python benchmarks/step_cost.py --model tiny-gemma3   # any model key, folder or hub id the project loads

Not a timing: a count, the same on every machine. The timed comparison is bench_ensemble.py's."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from constants import PACKAGED_MODELS  # noqa: E402


def layer_macs(config) -> int:
    """Per token, one decoder layer: the q, k, v, o projections and the gated MLP's three matrices."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.hidden_size * config.num_attention_heads * head_dim
    kv = 2 * config.hidden_size * config.num_key_value_heads * head_dim
    return 2 * q + kv + 3 * config.hidden_size * config.intermediate_size


def token_costs(config) -> dict:
    body = config.num_hidden_layers * layer_macs(config)
    head = config.hidden_size * config.vocab_size
    return {"layers": body, "head": head, "decode step": body + head, "head share": head / (body + head)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="a model (default: the packaged ones); repeat for several")
    args = p.parse_args(argv)
    from models import model_source, tiny_model
    from transformers import AutoConfig
    rows = []
    for name in args.model or PACKAGED_MODELS:
        config = (tiny_model(name.split("-", 1)[1])[0].config if name.startswith("tiny-")
                  else AutoConfig.from_pretrained(model_source(name)))
        rows.append((name, token_costs(config.get_text_config(decoder=True))))
    print("| model | layers (M MAC/token) | output head (M MAC/token) | decode step (M MAC/row) | head share |")
    print("|---|---|---|---|---|")
    for name, c in rows:
        print(f"| {name} | {c['layers'] / 1e6:.1f} | {c['head'] / 1e6:.1f} | {c['decode step'] / 1e6:.1f} | "
              f"{100 * c['head share']:.0f}% |")
    if len(rows) > 1:
        base = rows[0][1]
        for name, c in rows[1:]:
            print(f"\n{name} against {rows[0][0]}: a decode step {c['decode step'] / base['decode step']:.2f}x, "
                  f"a prefill token {c['layers'] / base['layers']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
