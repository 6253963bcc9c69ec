"""Where a decode step's exposed vector work goes, by opcode (issue 11, item 3).

Usage: python benchmarks/vector_breakdown.py [--weights int4] [--config PRESET] [--context 256]

Compiles ``kvoverlay bench decode``'s default decoder (hidden 512, 4 layers, 8 / 2 heads) for ``tiny-kv256`` (or
``--config``) and sums :func:`kvoverlay.timing.unit_cycles` per opcode over the compute queue's vector work (the
``vector`` row of the bench's breakdown: everything but GEMV, ATTN and KVAPPEND): instructions, elements, cycles,
cycles per element and the share. Formulas only, no simulation: the golden model's replay uses the same ones.
"""

from __future__ import annotations

import argparse
import collections
import sys


def breakdown(config, instructions, kv_len: int) -> dict:
    """``{opcode: [instructions, elements, cycles]}`` of the compute queue's vector work."""
    from kvoverlay import timing

    per = collections.defaultdict(lambda: [0, 0, 0])
    for ins in instructions:
        if ins.queue != "compute" or ins.op in ("END", "GEMV", "ATTN", "KVAPPEND"):
            continue
        f = ins.fields
        row = per[ins.op]
        row[0] += 1
        row[1] += f["len"] if "len" in f else f.get("heads", 0) * f.get("head_dim", 0)
        row[2] += timing.unit_cycles(config, ins, kv_len)
    return dict(per)


def main(argv=None) -> int:
    from kvoverlay.host.bench import BENCH_CONFIG, DecodeShape, compile_decoder

    from kvoverlay.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--config", default=None, help="a preset or TOML file (default: the bench's tiny-kv256)")
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args(argv)
    config = load_config(args.config) if args.config else BENCH_CONFIG
    program = compile_decoder(DecodeShape(), config, args.weights, args.context)
    per = breakdown(config, program.instructions, args.context)
    total = sum(row[2] for row in per.values())
    print("| opcode | instructions | elements | cycles | cycles / element | share |")
    print("|---|---|---|---|---|---|")
    for op, (n, elements, cycles) in sorted(per.items(), key=lambda kv: -kv[1][2]):
        print(f"| {op} | {n} | {elements:,} | {cycles:,} | {cycles / max(elements, 1):.2f} | {cycles / total:.1%} |")
    print(f"| all | {sum(r[0] for r in per.values())} | {sum(r[1] for r in per.values()):,} | {total:,} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
