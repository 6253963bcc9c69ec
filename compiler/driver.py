"""``compile_model``: the whole pipeline, ONNX file to program bundle, as one readable list of passes.

frontend -> lower -> specialize_mask -> fold_constants -> dead_code (``passes.PASSES``)
-> fuse (overlay operations) -> quantize + plan_memory + emit + insert_tokens (``codegen.generate``) -> bundle.

The graph is compiled for one decode step at a fixed past length (:data:`TRACE_KV_LEN`) so that the shape
subgraphs exporters emit fold away; the program itself is position-independent (the position comes in R1).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from kvoverlay import bundle as kvbundle
from kvoverlay.config import OverlayConfig, load_config

from .codegen import generate
from .frontend import CompileError
from .fuse import fuse, run_float
from .passes import run_passes

__all__ = ["TRACE_KV_LEN", "compile_model"]

#: Past length the graph is traced at; any value >= 1 works, one that no model dim equals reads best in dumps.
TRACE_KV_LEN = 5


#: Tokens of the calibration sequence whose GEMV inputs steer the int4 scale search.
CALIBRATION_TOKENS = 16


def calibrate(og, max_seq: int) -> dict:
    """The input vectors of every GEMV over a fixed pseudo-random token sequence, per matrix: [n, cols].

    The fused graph runs in float64 (``fuse.run_float``); no data beyond the model itself is needed.
    """
    vocab = next(t.shape[0] for kind, t in og.tables.values() if kind == "token")
    tokens = np.random.default_rng(0).integers(0, vocab, size=min(CALIBRATION_TOKENS, max_seq))
    seen = {}

    def observe(op, ins):
        if op.kind == "linear":
            seen.setdefault(op.attrs["matrix"], []).append(ins[0])

    run_float(og, tokens, observe=observe)
    return {n: np.stack(xs) for n, xs in seen.items()}


def compile_model(model, config: str | OverlayConfig | None = None, *, weights: str = "w16",
                  group_size: int | None = None, max_seq: int | None = None, kv_capacity: int | None = None,
                  method: str = "mse", dump_dir: str | os.PathLike | None = None):
    """Compile *model* (a path or ModelProto) for *config*; return ``(Bundle, report dict)``."""
    t0 = time.perf_counter()
    cfg = load_config(config)
    if kv_capacity is not None:
        cfg = cfg.replace(kv_capacity=kv_capacity)
    max_seq = cfg.kv_capacity if max_seq is None else max_seq
    if max_seq < 1:
        raise CompileError(f"--max-seq {max_seq} must be at least 1")
    graph = run_passes(model, dump_dir, kv_len=TRACE_KV_LEN)
    og = fuse(graph, max_seq=max_seq)
    if dump_dir is not None:
        with open(os.path.join(dump_dir, "10_fuse.txt"), "w") as f:
            f.write(og.dump())
    decoder = any(kind == "token" for kind, _ in og.tables.values())
    samples = calibrate(og, max_seq) if weights == "int4" and method == "mse" and decoder else None
    prog = generate(og, cfg, weights=weights, group_size=group_size, method=method, max_seq=max_seq,
                    samples=samples)
    if dump_dir is not None:
        from kvoverlay import isa

        with open(os.path.join(dump_dir, "11_codegen.s"), "w") as f:
            f.write(isa.disassemble(prog.instructions))
    src = model if isinstance(model, (str, os.PathLike)) else None
    digest = None
    if src:
        with open(src, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
    placement = {"overlay": sorted({op.kind for op in og.ops}), "host": []}
    og_logits = bool(og.logits)
    kv_layers = {str(k): {"kv_heads": v["kv_heads"], "head_dim": v["head_dim"]} for k, v in sorted(og.kv.items())}
    del graph, og, samples  # the float weights are in the image now; free them before the bundle is written
    meta = dict(prog.meta)
    meta.update({
        "max_seq": max_seq,
        "kv": {"layers": kv_layers, "capacity": cfg.kv_capacity},
        "registers_in": {"input_ids": "R0", "position_ids": "R1"} if og_logits else {},
        "placement": placement,
        "source": {"sha256": digest, "name": os.path.basename(src) if src else None},
    })
    b = kvbundle.Bundle(config=cfg, instructions=prog.instructions, image=prog.image, manifest=meta)
    report = {
        "instructions": len(prog.instructions),
        "program_bytes": kvbundle.encoded_size(b),
        "weight_bytes": meta["weight_bytes"],
        "kv_capacity_tokens": cfg.kv_capacity,
        "placement": placement,
        "compile_s": round(time.perf_counter() - t0, 3),
    }
    return b, report
