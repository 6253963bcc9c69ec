"""Teacher-forced NLL of int4 weight formats on a trained model, against fp32 onnxruntime.

Usage: python benchmarks/int4_formats.py MODEL.onnx TEXT_FILE [--config u280] [--group 32] [--json OUT]
                                        [--variants ort-nbits-asym,int4-mse,...]

The text is tokenized with the ``tokenizer.json`` beside the model. Every variant scores the same tokens: the
mean negative log-likelihood of each next token given the ones before it.

* ``fp32``: onnxruntime on the model as given.
* ``ort-nbits-asym`` / ``ort-nbits-sym``: onnxruntime on the model quantized by its own ``MatMulNBitsQuantizer``
  (block ``--group``, with / without zero points).
* ``imported-asym``: the golden model on the compile of that asymmetric MatMulNBits file (weights as given).
* ``int4-rtn``, ``int4-mse``, ``uint4-rtn``, ``uint4-mse``: the golden model on the compiler's own quantization of
  the float model at group ``--group`` (``--weights int4`` or ``uint4``, ``--quant rtn`` or ``mse``).

Prints one table row per variant (NLL, perplexity, NLL change against fp32) as it finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.session import Session

VARIANTS = ("fp32", "ort-nbits-asym", "ort-nbits-sym", "imported-asym", "int4-rtn", "int4-mse", "uint4-rtn", "uint4-mse")


def _nll(logits, targets) -> float:
    total = 0.0
    for row, t in zip(logits, targets, strict=True):
        row = np.asarray(row, np.float64)
        top = row.max()
        total += top + np.log(np.sum(np.exp(row - top))) - row[t]
    return total / len(targets)


def _ort_logits(path, ids):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.asarray([ids], np.int64)}
    names = {i.name: i for i in sess.get_inputs()}
    for n, i in names.items():
        if n.startswith("past_key_values"):
            feed[n] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((1, len(ids)), np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.arange(len(ids), dtype=np.int64).reshape(1, -1)
    return sess.run(["logits"], feed)[0][0, :-1]


def _golden_logits(path, ids, config, **options):
    b, _ = compile_model(path, config, max_seq=len(ids), **options)
    with Session(b, backend="isa") as s:
        return s.teacher_forced(ids[:1], ids[1:])


def _nbits(model_path, group, symmetric, out):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(model_path)), block_size=group, is_symmetric=symmetric)
    q.process()
    onnx.save(q.model.model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("text", type=Path)
    ap.add_argument("--config", default="u280")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(args.model.parent / "tokenizer.json")).encode(args.text.read_text()).ids
    targets = ids[1:]
    print(f"{len(ids)} tokens; config {args.config}, group {args.group}", file=sys.stderr)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        nbits = {}
        for v in args.variants.split(","):
            t0 = time.perf_counter()
            if v == "fp32":
                logits = _ort_logits(args.model, ids)
            elif v.startswith("ort-nbits-") or v == "imported-asym":
                sym = v.endswith("-sym")
                if sym not in nbits:
                    nbits[sym] = _nbits(args.model, args.group, sym, Path(tmp) / f"nbits-{sym}.onnx")
                if v == "imported-asym":
                    logits = _golden_logits(nbits[sym], ids, args.config)
                else:
                    logits = _ort_logits(nbits[sym], ids)
            else:
                fmt, method = v.split("-")
                logits = _golden_logits(args.model, ids, args.config, weights=fmt, method=method, group_size=args.group)
            results[v] = {"nll": _nll(logits, targets), "seconds": round(time.perf_counter() - t0, 1)}
            base = results.get("fp32", {}).get("nll")
            rel = f"{100 * (results[v]['nll'] / base - 1):+.2f}%" if base else "-"
            print(f"| {v} | {results[v]['nll']:.4f} | {np.exp(results[v]['nll']):.3f} | {rel} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"tokens": len(targets), "group": args.group, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
