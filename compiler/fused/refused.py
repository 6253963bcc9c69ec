"""Why an op cannot run on the overlay (what the instruction set lacks): the fuser's error when no rule took a
value of one of these ops, instead of the generic "not supported"."""

from __future__ import annotations

__all__ = ["REASONS"]

_GATE = ("the vector unit's ACT computes only x * gate(x) for its three gates (SiLU, GELU erf, GELU tanh); "
         "the gate alone would need a fourth ACT function (the 2-bit func field has room, the unit's table does not)")
_NO_DIVIDE = "the overlay has no elementwise divide, reciprocal, square root or power of a computed vector"

#: op type -> why the overlay cannot run it standalone.
REASONS = {
    "Erf": _GATE + " (erf(x) = 2*Phi(x*sqrt(2)) - 1 needs the GELU gate alone; sigmoid and tanh run as softmaxes on "
                   "the attention unit, but no softmax gives Phi)",
    "ReduceMax": "ARGMAX returns the index of the maximum into a register, not its value; no max-reduction writes a vector",
    "ReduceMin": "the overlay has no min-reduction (ARGMAX returns an index only)",
    "Pow": _NO_DIVIDE,
    "Sqrt": _NO_DIVIDE + " (NORM's reciprocal square root is applied to the normalized vector only)",
    "Reciprocal": _NO_DIVIDE,
    "Div": _NO_DIVIDE,
    "Where": "a Where on a computed condition selects per element; the overlay has no compare or select",
    "LayerNormalization": ("its Mean output is computed, but InvStdDev (1/sqrt(var + eps)) is not: NORM yields only "
                           "the normalized vector, never the reciprocal standard deviation itself"),
}

