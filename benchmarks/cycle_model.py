"""The golden model's cycle prediction against the RTL's counters on a bench set (issue 11, item 4).

Usage: python benchmarks/cycle_model.py [--json OUT.json]

On ``tiny`` (the Verilated run-path harness; a first run builds it): the demo decoder in every weight format (a
5-token session), ``bench decode`` points at two sizes and three formats and attention lengths from 2 to 64, GEMVs
of three shapes, and an LM head of 49,152 rows tiled over the accumulator buffer (49 tiles). Prints each point's RTL
and golden-model cycles per step and their difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def points():
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.host.bench import DecodeShape, bench_decode
    from kvoverlay.host.session import Session
    from kvoverlay.models import exported
    from kvoverlay.models.demo import build_llama_onnx
    from kvoverlay.sim.bench import bench_gemv

    from kvoverlay.config import PRESETS

    tiny = PRESETS["tiny"]

    def session(program, prompt, new):
        gold = Session(program, "isa").generate(prompt, new).step_cycles
        with Session(program, "rtl") as s:
            return s.generate(prompt, new).result().step_cycles, gold

    with tempfile.TemporaryDirectory() as tmp:
        build_llama_onnx(Path(tmp) / "demo.onnx")
        for w in ("w16", "int8", "int4"):
            program = compile_model(str(Path(tmp) / "demo.onnx"), "tiny", weights=w, max_seq=10)[0]
            yield (f"demo decoder {w}, 7 steps", *session(program, [5, 17, 42], 5))
    small = DecodeShape(hidden=128, layers=2, heads=4, kv_heads=2, vocab=256)
    wide = DecodeShape(hidden=256, layers=1, heads=4, kv_heads=1, vocab=256)
    for shape, w, ctx in [(small, "int8", 40), (small, "int4", 9), (small, "w16", 2), (wide, "w16", 64)]:
        r = bench_decode(shape, tiny, w, context=ctx, steps=2, backend="rtl")
        yield (f"decode hidden {shape.hidden}, {shape.layers} layers, {w}, KV {ctx}", [r["cycles_per_token"]],
               [r["model_cycles_per_token"]])
    for rows, cols, w in [(256, 256, "int4"), (96, 512, "w16"), (1024, 1024, "int8")]:
        r = bench_gemv(tiny, rows, cols, w, "rtl")
        yield f"GEMV {rows}x{cols} {w}", [r["cycles"]], [r["golden_cycles"]]
    head = exported.export_model("llama", vocab_size=49152, num_hidden_layers=1)
    program = compile_model(str(head), "tiny", weights="int8", max_seq=3)[0]
    yield ("LM head of 49,152 rows tiled (49 tiles), int8, 2 steps", *session(program, [5], 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the points here")
    args = p.parse_args(argv)
    out = []
    for name, rtl, gold in points():
        diff = [g - r for r, g in zip(rtl, gold)]
        print(f"{name}: RTL {rtl}, golden model {gold}, golden - RTL {diff}", flush=True)
        out.append({"point": name, "rtl": rtl, "golden": gold})
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if all(p["rtl"] == p["golden"] for p in out) else 1


if __name__ == "__main__":
    sys.exit(main())
