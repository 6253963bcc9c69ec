"""``run_float``: the fused graph evaluated in float64, one decode step per token.

This is the fused program before quantization: it separates fusion errors from numerics, and its
GEMV inputs calibrate the int4 scale search. Each op computes itself (``VOp.reference``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .overlay_graph import OverlayGraph

__all__ = ["Step", "run_float"]


@dataclass
class Step:
    """What an op's reference may read besides its inputs: the graph, this step's token and position,
    the host-written input vectors, and every layer's keys and values so far."""

    og: OverlayGraph
    token: int
    position: int
    feeds: dict | None = None
    kv: dict = field(default_factory=dict)  # layer -> ([keys [kv_heads, head_dim] per step], [values ...])


def run_float(og: OverlayGraph, tokens, *, observe=None, feeds=None) -> list:
    """Evaluate *og* in float64 on a token sequence (one step per token); return the logits of every step
    (or, for a graph without logits, its outputs by name).

    *observe*, if given, is called as ``observe(op, inputs)`` before every op (calibration statistics).
    """
    kv = {layer: ([], []) for layer in og.kv}
    out = []
    for pos, tok in enumerate(tokens):
        step = Step(og, tok, pos, feeds, kv)
        env = {}
        for op in og.ops:
            ins = [env[v] for v in op.ins]
            if observe is not None:
                observe(op, ins)
            env[op.out] = np.asarray(op.reference(ins, step), np.float64).reshape(-1)
        out.append(env[og.logits] if og.logits else {o: env[v] for o, (v, _) in og.outputs.items()})
    return out
