"""``norm``: RMSNorm (spelled out, or ``RMSNormalization``) and ``LayerNormalization``, with their gain
(a spelled-out RMSNorm's gain is the constant vector it is multiplied by); a LayerNormalization bias
becomes an ``addc``."""

from __future__ import annotations

import math

import numpy as np

from kvoverlay import isa

from ..overlay_graph import VOp
from .act import PROBE
from .elementwise import AddC

__all__ = ["Norm", "norm_core"]


class Norm(VOp):
    kind = "norm"

    @staticmethod
    def match(fz, v, node):
        if node.op == "LayerNormalization":
            x, scale = node.inputs[0], node.inputs[1]
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
            return _norm_op(fz, v, node, x, scale, bias, "layer", float(node.attrs.get("epsilon", 1e-5)))
        if node.op == "RMSNormalization":
            return _norm_op(fz, v, node, node.inputs[0], node.inputs[1], None, "rms",
                            float(node.attrs.get("epsilon", 1e-5)))
        core = norm_core(fz, v)
        if core is None:
            return _gained(fz, v, node)
        x, eps, kind = core
        n = fz.ix.numel(v)
        g = fz.store(fz.out.consts, "c", np.ones(n))
        return fz.add(Norm, v, [fz.vector(x)], node.name, gain=g, eps=eps, kind=kind)

    def reference(self, ins, step):
        x = ins[0]
        if self.attrs["kind"] == "layer":
            x = x - x.mean()
        return x / np.sqrt(np.mean(x * x) + self.attrs["eps"]) * step.og.consts[self.attrs["gain"]]

    def emit(self, cg, src):
        n = cg.lengths[self.out]
        g = cg.load_const(self.attrs["gain"], n)
        eps_m, eps_e = _eps_imm(self.attrs["eps"])
        dst = cg.vector(self.out)
        cg.instr("NORM", x=src[0][0], x_e=src[0][1], g=g[0], g_e=g[1], dst=dst[0], dst_e=dst[1], len=n,
                 eps_m=eps_m, eps_e=eps_e, kind=isa.ENUMS["norm"].index(self.attrs["kind"]))


def _gained(fz, v, node):
    """Mul(spelled-out RMSNorm, constant gain vector), the norm's only use: the norm with that gain."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    ca, cb = fz.ix.const(a), fz.ix.const(b)
    if (ca is None) == (cb is None):
        return None
    var, c, gain = (b, ca, a) if ca is not None else (a, cb, b)
    if c.size == 1:
        return None
    n = fz.ix.numel(v)
    core = norm_core(fz, var) if fz.ix.numel(var) == n else None
    if core is None or len(fz.ix.consumers.get(fz.ix.resolve(var), [])) > 1:
        return None
    x, eps, kind = core
    g = fz.const_vector(gain, n)
    return fz.add(Norm, v, [fz.vector(x)], node.name, gain=g, eps=eps, kind=kind)


def _eps_imm(eps: float) -> tuple[int, int]:
    """NORM's (eps_m, eps_e): eps as a 16-bit mantissa times a power of two."""
    e = math.frexp(eps)[1] - 16
    return round(eps * 2.0 ** -e), e


def _norm_op(fz, v, node, x, scale, bias, kind, eps):
    shp = fz.ix.shape(x)
    axis = node.attrs.get("axis", -1) % len(shp)
    if any(d != 1 for d in shp[:axis]) or axis != len(shp) - 1:
        fz.fail(v, "normalizes over more than the last axis")
    n = fz.ix.numel(v)
    if not fz.ix.is_const(scale):
        fz.fail(v, "has a computed scale")
    g = fz.const_vector(scale, n)
    y = fz.add(Norm, v, [fz.vector(x)], node.name, gain=g, eps=eps, kind=kind)
    if bias is not None:
        y = fz.add(AddC, v, [y], node.name, const=fz.const_vector(bias, n))
    return y


def norm_core(fz, v):
    """RMSNorm without gain spelled out: x * rsqrt(mean(x^2) + eps) or x / sqrt(mean(x^2) + eps)."""
    node = fz.ix.producer.get(fz.ix.resolve(v))
    if node is None or node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    pairs = [(0, 1), (1, 0)] if node.op == "Mul" else [(0, 1)]
    for i, j in pairs:
        x, r = node.inputs[i], node.inputs[j]
        if fz.ix.is_const(x) or fz.ix.is_const(r):
            continue
        mean = fz.ix.unary_leaf(r)
        mnode = fz.ix.producer.get(mean) if mean else None
        if mnode is None or mnode.op != "ReduceMean":
            continue
        sq = mnode.inputs[0]
        leaf = fz.ix.unary_leaf(sq)
        if leaf is None or fz.ix.resolve(leaf) != fz.ix.resolve(x):
            continue
        if not np.allclose(fz.ix.probe(sq, leaf, PROBE), PROBE ** 2, rtol=1e-5, atol=1e-6):
            continue
        if fz.ix.numel(mean) != 1:
            continue
        ts = np.array([0.0, 0.01, 0.5, 2.0, 37.0])
        f = fz.ix.probe(r, mean, ts)
        if node.op == "Mul":
            eps = 1.0 / f[0] ** 2 if f[0] > 0 else -1
            want = 1.0 / np.sqrt(ts + eps)
        else:
            eps = f[0] ** 2
            want = np.sqrt(ts + eps)
        if eps > 0 and np.allclose(f, want, rtol=1e-4):
            return x, float(np.float32(eps)), "rms"
    return None
