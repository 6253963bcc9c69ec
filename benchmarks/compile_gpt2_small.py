"""Compile speed and peak memory of a GPT-2-small-shaped export (124M parameters, 12 layers).

Usage: python benchmarks/compile_gpt2_small.py [--weights w16|int8|int4] [--quant rtn|mse]

Exports a random-init GPT-2 (n_embd 768, 12 layers, 12 heads, vocab 50257, 1024 positions) with optimum-onnx
(cached like the test models), then runs ``kvoverlay compile`` in a fresh process and reports its wall time and
peak resident memory against the model file's size. The overlay config is the u280 preset with room for
GPT-2's 12 KV heads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvoverlay.models.exported import export_model

GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": 3072, "vocab_size": 50257, "n_positions": 1024}
#: The compile, reporting its own peak resident memory (VmHWM, KiB) as the last line of stderr. VmHWM belongs to
#: the process's own address space; ru_maxrss can carry a forked parent's high-water mark across exec.
_CHILD = ("import re, sys; from kvoverlay.cli import main; rc = main(sys.argv[1:]); "
          "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr); sys.exit(rc)")
CONFIG = 'preset = "u280"\nmax_layers = 12\nmax_kv_heads = 12\nmax_head_dim = 64\nkv_capacity = 128\n'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="int8", choices=["w16", "int8", "int4"])
    ap.add_argument("--quant", default="mse", choices=["rtn", "mse"])
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = export_model("gpt2", **GPT2_SMALL)
    print(f"export: {model} ({model.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s "
          "(cached after the first run)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "gpt2_small.toml"
        cfg.write_text(CONFIG)
        t1 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _CHILD, "compile", str(model), "-o", str(Path(tmp) / "g.kvo"),
                              "--config", str(cfg), "--weights", args.weights, "--quant", args.quant, "--json"],
                             capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t1
    if res.returncode:
        print(res.stderr, file=sys.stderr)
        return res.returncode
    peak = int(res.stderr.strip().splitlines()[-1]) * 1024
    stdout = res.stdout
    report = json.loads(stdout)
    size = model.stat().st_size
    out = {"model_bytes": size, "weights": args.weights, "quant": args.quant, "wall_s": round(wall, 2), "compile_s": report["compile_s"],
           "peak_rss_bytes": peak, "peak_over_model": round(peak / size, 2), "program_bytes": report["program_bytes"],
           "weight_bytes": report["weight_bytes"], "instructions": report["instructions"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
