"""The sha256 of every bundle the compiler makes of the demo decoder and the exported test models.

Usage: python benchmarks/compile_hashes.py [--out hashes.json] [--compare before.json] [--dump-dir DIR]

A refactor of the compiler that is meant to change nothing must leave every hash as it was: record them
before (``--out``), then check after (``--compare``, exit 1 on any difference). Each model is compiled
for the tiny preset in w16, int8 and int4 (mse and rtn). The optimum exports are cached like the test
models' (``.cache/models`` or ``$KVOVERLAY_CACHE``); the first export takes minutes. With ``--dump-dir``
every compile also writes its pass dumps under ``DIR/<model>-<weights>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from kvoverlay.compiler.driver import compile_model
from kvoverlay.models.demo import build_llama_onnx
from kvoverlay.models.exported import build_onnx_ops_decoder, export_model

from kvoverlay import bundle as kvbundle

EXPORTED = ("llama", "mistral", "qwen2", "gpt2", "gemma", "phi3", "opt", "stablelm", "gpt_neox", "qwen3")
#: (label, weights, method)
VARIANTS = (("w16", "w16", "mse"), ("int8", "int8", "mse"), ("int4-mse", "int4", "mse"), ("int4-rtn", "int4", "rtn"))


def models() -> dict:
    """Model name -> path or ModelProto, in a fixed order."""
    return {"demo": build_llama_onnx(), **{fam: export_model(fam) for fam in EXPORTED},
            "onnx_ops": build_onnx_ops_decoder()}


def bundle_hashes(dump_root: Path | None = None) -> dict:
    hashes = {}
    for name, model in models().items():
        for label, weights, method in VARIANTS:
            t0 = time.perf_counter()
            dump = None if dump_root is None else dump_root / f"{name}-{label}"
            b, _ = compile_model(model, "tiny", weights=weights, method=method, dump_dir=dump)
            key = f"{name}/{label}"
            hashes[key] = hashlib.sha256(kvbundle.to_bytes(b)).hexdigest()
            print(f"{key}: {hashes[key][:16]} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return hashes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the hashes as JSON")
    ap.add_argument("--compare", type=Path, help="compare with hashes written earlier; exit 1 on a difference")
    ap.add_argument("--dump-dir", type=Path, help="write every compile's pass dumps under this folder")
    args = ap.parse_args()
    hashes = bundle_hashes(args.dump_dir)
    if args.out:
        args.out.write_text(json.dumps(hashes, indent=1) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        diff = sorted(k for k in before.keys() | hashes.keys() if before.get(k) != hashes.get(k))
        for k in diff:
            print(f"DIFFERENT {k}: {before.get(k)} -> {hashes.get(k)}")
        print(f"{len(hashes) - len(diff)}/{len(hashes)} bundles identical")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
