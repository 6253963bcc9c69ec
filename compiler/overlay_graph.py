"""The fused IR: a decode step as overlay operations on flat vectors, and the tensors they read.

:class:`VOp` is the base of every fused-op kind (``compiler/fused/``): a kind is a subclass that
knows its float64 reference (what ``run_float`` evaluates) and its code generation (what the
``emit`` pass writes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

__all__ = ["INDEX_INPUTS", "OverlayGraph", "VOp"]

#: Scalar graph inputs a program receives in registers, and the index kind each is.
INDEX_INPUTS = {"input_ids": "token", "position_ids": "position"}


@dataclass
class VOp:
    """One overlay-level operation: writes vector *out* from vectors *ins*.

    Subclasses set :attr:`kind` and implement :meth:`reference` and :meth:`emit`; the fusion rule that
    produces a kind, if it has one of its own, is its :meth:`match`.
    """

    kind: ClassVar[str]
    out: str
    ins: list
    attrs: dict = field(default_factory=dict)
    source: str = ""  # ONNX node the op came from
    #: Words at the top of the accumulator buffer the op keeps statistics in (attention's softmax max and sum).
    stats_words: ClassVar[int] = 0

    def describe(self) -> str:
        attrs = " ".join(f"{k}={_short(v)}" for k, v in sorted(self.attrs.items()))
        return f"{self.out} = {self.kind}({', '.join(self.ins)}) {attrs}  # {self.source}"

    @staticmethod
    def match(fz, v: str, node) -> str | None:
        """If ONNX value *v* (made by *node*, None for a graph input) is this kind's pattern: add the ops that
        compute it to *fz* (a ``fuse.Fuser``) and return the vector holding it; else None."""
        return None

    def reference(self, ins: list, step) -> np.ndarray:
        """The op's output in float64, from its input vectors *ins*, at the step *run* (a ``reference.Step``)."""
        raise NotImplementedError(f"{type(self).__name__}.reference")

    def emit(self, cg, src: list) -> None:
        """Append the op's instructions to *cg* (a ``codegen.Codegen``); *src* holds its inputs' placements."""
        raise NotImplementedError(f"{type(self).__name__}.emit")


def _short(v):
    if isinstance(v, np.ndarray):
        return f"array{list(v.shape)}"
    if isinstance(v, float):
        return f"{v:.6g}"
    return repr(v)


@dataclass
class OverlayGraph:
    """The fused program: vector lengths, operations in execution order, and the tensors they need."""

    lengths: dict = field(default_factory=dict)  # vector name -> elements
    ops: list = field(default_factory=list)
    matrices: dict = field(default_factory=dict)  # name -> float [rows, cols] (GEMV weights, out x in)
    prequantized: dict = field(default_factory=dict)  # matrix name -> its given quantized form (MatMulNBits)
    tables: dict = field(default_factory=dict)  # name -> (index kind, float [entries, cols])
    consts: dict = field(default_factory=dict)  # name -> float [n] (gains, biases)
    logits: str = ""
    kv: dict = field(default_factory=dict)  # layer -> {"kv_heads", "head_dim", "present": (key, value)}
    inputs: dict = field(default_factory=dict)  # ONNX input -> (vector, shape): vectors the host writes each run
    outputs: dict = field(default_factory=dict)  # ONNX output -> (vector, shape): vectors stored after each run

    def dump(self) -> str:
        lines = [(f"overlay graph: {len(self.ops)} ops, {len(self.matrices)} matrices, {len(self.tables)} tables, "
                  f"{len(self.consts)} constant vectors")]
        lines += [f"matrix {n}: {list(m.shape)}" for n, m in self.matrices.items()]
        lines += [f"table  {n}: {k} {list(t.shape)}" for n, (k, t) in self.tables.items()]
        lines += [f"const  {n}: [{c.size}]" for n, c in self.consts.items()]
        lines += [f"[{self.lengths[op.out]}] {op.describe()}" for op in self.ops]
        lines.append(f"logits {self.logits}; kv layers {sorted(self.kv)}")
        return "\n".join(lines) + "\n"
