"""``compile_model``: ONNX model to program bundle through the pass list of ``passes.PIPELINE``.

The graph is compiled for one decode step at a fixed past length (:data:`TRACE_KV_LEN`) so that the shape
subgraphs exporters emit fold away; the program itself is position-independent (the position comes in R1).
"""

from __future__ import annotations

import os
import time

from kvoverlay import bundle as kvbundle
from kvoverlay.config import OverlayConfig, load_config

from .frontend import CompileError
from .passes import Compilation, run_pipeline
from .quantize import SEARCHED

__all__ = ["TRACE_KV_LEN", "compile_model"]

#: Past length the graph is traced at; any value >= 1 works, one that no model dim equals reads best in dumps.
TRACE_KV_LEN = 5


def compile_model(model, config: str | OverlayConfig | None = None, *, weights: str = "w16",
                  group_size: int | None = None, max_seq: int | None = None, kv_capacity: int | None = None,
                  method: str | None = None, dump_dir: str | os.PathLike | None = None, host_ops: bool = True,
                  logits: bool = True):
    """Compile *model* (a path or ModelProto) for *config*; return ``(Bundle, report dict)``.

    *method* picks how 4-bit scales are chosen (``rtn`` or ``mse``); None takes the format's default
    (:data:`~kvoverlay.compiler.quantize.SEARCHED`). With *host_ops* (the default), nodes the overlay cannot run
    are placed on the host (``placement.host`` in the manifest); without, the first of them is the
    :class:`CompileError`. Without *logits* the program leaves only the next token (the on-chip argmax), its LM
    head reduced to GEMVs and the ARGMAXACC chain.
    """
    t0 = time.perf_counter()
    cfg = load_config(config)
    if kv_capacity is not None:
        cfg = cfg.replace(kv_capacity=kv_capacity)
    max_seq = cfg.kv_capacity if max_seq is None else max_seq
    if max_seq < 1:
        raise CompileError(f"--max-seq {max_seq} must be at least 1")
    forced = set()
    while True:
        c = Compilation(model, cfg=cfg, kv_len=TRACE_KV_LEN, max_seq=max_seq, weights=weights,
                        group_size=group_size or cfg.group_size, method=method or SEARCHED.get(weights, "mse"), host_ops=host_ops,
                        host_nodes=frozenset(forced), logits=logits)
        try:
            b = run_pipeline(c, dump_dir).bundle
            break
        except CompileError as exc:
            # a pass after partition refused a node of a graph fused whole (out of registers, ...): place it too
            if not host_ops or c.segments is not None or exc.node is None or exc.node in forced:
                raise
            forced.add(exc.node)
    segments = [kvbundle.from_bytes(b.image[s["blob"][0]:sum(s["blob"])]) for s in b.manifest.get("segments", [])
                if s["kind"] == "overlay"]
    report = {
        "instructions": len(b.instructions) + sum(len(s.instructions) for s in segments),
        "program_bytes": kvbundle.encoded_size(b),
        "weight_bytes": b.manifest["weight_bytes"],
        "kv_capacity_tokens": cfg.kv_capacity,
        "placement": b.manifest["placement"],
        "compile_s": round(time.perf_counter() - t0, 3),
    }
    return b, report
