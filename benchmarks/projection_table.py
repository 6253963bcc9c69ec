"""The projection table of docs/benchmarks.md ("Projection: full-size models on datacenter cards"), computed anew.

Usage: python benchmarks/projection_table.py [--config u280] [--context 128]

Each row is :func:`kvoverlay.host.project.project` (``kvoverlay bench project``'s model): a projection from the
validated cycle model, not a measurement. FlightLLM's figure is its paper's, for LLaMA2-7B at 4 bits on one U280.
"""

from __future__ import annotations

import argparse
import sys

#: (model, weights, cards, label, FlightLLM's published tokens/s or "")
ROWS = [
    ("llama2-7b", "int4", 1, "LLaMA2-7B (6.74B)", "55"),
    ("llama2-7b", "int4", 4, "LLaMA2-7B", ""),
    ("llama2-7b", "int8", 1, "LLaMA2-7B", ""),
    ("llama3-8b", "int4", 1, "Llama-3-8B (8.03B)", ""),
    ("llama3-8b", "int4", 4, "Llama-3-8B", ""),
    ("gpt2-xl", "int4", 1, "GPT-2-XL (1.56B)", ""),
    ("smollm-135m", "int8", 1, "SmolLM-135M shape (the issue's 135M model)", ""),
]


def main(argv=None) -> int:
    from kvoverlay.host.project import project

    from kvoverlay.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="u280")
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args(argv)
    config = load_config(args.config)
    print("| model (parameters) | weights | cards | projected tokens/s | bandwidth limit tokens/s | efficiency "
          "| FlightLLM, published (measured on one U280) |")
    print("|---|---|---|---|---|---|---|")
    for model, weights, cards, label, flightllm in ROWS:
        r = project(model, config, weights, devices=cards, context=args.context)
        print(f"| {label} | {weights} | {cards} | {r['tokens_per_s']:.1f} | {r['bandwidth_limit_tokens_per_s']:.1f} "
              f"| {r['bandwidth_efficiency']:.1%} | {flightllm} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
