"""``act``: any elementwise region of one input that *evaluates* to SiLU, GELU (erf), GELU (tanh) or ReLU on
a probe grid, however the exporter spelled it."""

from __future__ import annotations

import math

import numpy as np

from kvoverlay import isa

from ..overlay_graph import VOp
from .elementwise import Scale

__all__ = ["GATES", "PROBE", "Act"]

#: Activation gates the overlay's ACT instruction computes, as float references for probing.
GATES = {
    "silu": lambda t: t / (1.0 + np.exp(-t)),
    "gelu_erf": lambda t: 0.5 * t * (1.0 + np.vectorize(math.erf)(t / math.sqrt(2.0))),
    "gelu_tanh": lambda t: 0.5 * t * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3))),
    "relu": lambda t: np.maximum(t, 0.0),
}
#: Where an elementwise region is evaluated to identify it.
PROBE = np.linspace(-6.0, 6.0, 97)
#: ReLU's gate table is a step that ramps over the one table segment above 0, so ACT is exact only where
#: every nonzero input is at least a segment (2**-5). Scaling the input by 2**RELU_PRESCALE first (and the
#: output back; both exact) makes ReLU exact for every vector whose peak is at least 2**-11, while ACT's
#: fixed-point input (shifted left by exponent + ACT_FRAC) stays within int64 for peaks below 2**30.
RELU_PRESCALE = 20


class Act(VOp):
    kind = "act"

    @staticmethod
    def match(fz, v, node):
        if node.op not in ("Mul", "Gelu", "Div", "Add", "Relu"):
            return None
        leaf = fz.ix.unary_leaf(v)
        if leaf is None:
            return None
        got = fz.ix.probe(v, leaf, PROBE)
        # the closest gate, and close at float32 precision: GELU's erf and tanh forms differ by only ~3e-4
        err = {func: float(np.max(np.abs(got - ref(PROBE)))) for func, ref in GATES.items()}
        func = min(err, key=err.get)
        if not err[func] <= 1e-5 * (1 + np.max(np.abs(PROBE))):  # a nan (sqrt(x) * x at x < 0) matches nothing
            return None
        x = fz.vector(leaf)
        if func != "relu":
            return fz.add(Act, v, [x], node.name, func=func)
        x = fz.add(Scale, v, [x], node.name, factor=2.0 ** RELU_PRESCALE)
        y = fz.add(Act, v, [x], node.name, func=func)
        return fz.add(Scale, v, [y], node.name, factor=2.0 ** -RELU_PRESCALE)

    def reference(self, ins, step):
        return GATES[self.attrs["func"]](ins[0])

    def emit(self, cg, src):
        dst = cg.vector(self.out)
        cg.instr("ACT", x=src[0][0], x_e=src[0][1], dst=dst[0], dst_e=dst[1], len=cg.lengths[self.out],
                 func=isa.ENUMS["func"].index(self.attrs["func"]))
