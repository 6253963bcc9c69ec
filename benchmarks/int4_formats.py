"""Teacher-forced NLL of int4 weight formats on a trained model, against fp32 onnxruntime.

Usage: python benchmarks/int4_formats.py MODEL.onnx TEXT_FILE [--config u280] [--group 32] [--json OUT]
                                        [--variants ort-nbits-asym,int4-mse,...] [--weights-only]

The text is tokenized with the ``tokenizer.json`` beside the model. Every variant scores the same tokens: the
mean negative log-likelihood of each next token given the ones before it.

* ``fp32``: onnxruntime on the model as given.
* ``ort-nbits-asym`` / ``ort-nbits-sym``: onnxruntime on the model quantized by its own ``MatMulNBitsQuantizer``
  (block ``--group``, with / without zero points).
* ``imported-asym``: the golden model on the compile of that asymmetric MatMulNBits file (weights as given).
* ``int4-rtn``, ``int4-mse``, ``uint4-rtn``, ``uint4-mse``: the golden model on the compiler's own quantization of
  the float model at group ``--group`` (``--weights int4`` or ``uint4``, ``--quant rtn`` or ``mse``).

With ``--weights-only`` the compiler's variants run in fp32 onnxruntime too, on the model with every GEMV
weight replaced by its dequantized value from the compiled memory image: the error of the weight format alone,
comparable with onnxruntime's MatMulNBits runs (whose activations are fp32 as well), and many times faster
than the golden model on a 135M model.

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


def _dequantized_model(path, config, out, *, tables: bool = False, **options):
    """*path* with each MatMul weight the compiler placed replaced by its dequantized value from the image; with
    *tables*, the token-embedding table (a Gather's initializer equal to it) as well."""
    from kvoverlay.compiler.driver import TRACE_KV_LEN
    from kvoverlay.compiler.passes import Compilation, run_pipeline
    from onnx import numpy_helper

    from kvoverlay import numerics as nx
    from kvoverlay.config import load_config

    cfg = load_config(config)
    c = run_pipeline(Compilation(str(path), cfg=cfg, kv_len=TRACE_KV_LEN, max_seq=TRACE_KV_LEN + 1, **options),
                     until="quantize")
    model = onnx.load(str(path))
    producer = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}

    def placed(r):
        stride = nx.row_stride(r.cols, r.fmt, r.group, cfg.port_bytes)
        q, sm = nx.unpack_rows(bytes(c.image.data[r.addr: r.addr + r.rows * stride]), r.rows, r.cols, r.fmt, r.group)
        return nx.dequantize_matrix(q, sm, r.sexp, r.group).astype(np.float32)  # unpack_rows gives effective weights

    for name, (kind, t) in c.og.tables.items() if tables else ():
        if kind != "token":
            continue
        same = [i for i in inits.values() if tuple(i.dims) == t.shape and np.array_equal(numpy_helper.to_array(i), t)]
        if len(same) != 1:
            raise SystemExit(f"token table {name} {list(t.shape)}: {len(same)} initializers equal to it")
        same[0].CopyFrom(numpy_helper.from_array(placed(c.image.records[name]), same[0].name))
    for op in c.og.ops:
        if op.kind != "linear":
            continue
        w = placed(c.image.records[op.attrs["matrix"]]).T
        name = producer[op.source].input[1]
        if tuple(inits[name].dims) != w.shape:
            raise SystemExit(f"{op.source}: a {list(w.shape)} GEMV for weight {name} {list(inits[name].dims)}")
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


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
    ap.add_argument("--weights-only", action="store_true", help="run the compiler's variants in fp32 onnxruntime")
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
                options = {"weights": fmt, "method": method, "group_size": args.group}
                if args.weights_only:
                    logits = _ort_logits(_dequantized_model(args.model, args.config, Path(tmp) / f"{v}.onnx", **options), ids)
                else:
                    logits = _golden_logits(args.model, ids, args.config, **options)
            results[v] = {"nll": _nll(logits, targets), "seconds": round(time.perf_counter() - t0, 1)}
            base = results.get("fp32", {}).get("nll")
            rel = f"{100 * (results[v]['nll'] / base - 1):+.2f}%" if base else "-"
            print(f"| {v} | {results[v]['nll']:.4f} | {np.exp(results[v]['nll']):.3f} | {rel} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"tokens": len(targets), "group": args.group, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
