"""``norm``: RMSNorm (spelled out, or ``RMSNormalization``) and ``LayerNormalization``, with their gain
(a spelled-out RMSNorm's gain is the constant vector it is multiplied by); a LayerNormalization bias
becomes an ``addc``. A spelled-out RMSNorm over each head (Qwen3's and Gemma 3's q/k norms) is one NORM with
``head_dim`` set and its gain repeated for every head; where the vector unit cannot walk those heads (a head_dim
not a multiple of ``vector_lanes``, or a unit built without it: ``config.norm_heads``), each head is normalized as a
row of its own (:func:`norm_rows`)."""

from __future__ import annotations

import math

import numpy as np

from kvoverlay import isa

from ..overlay_graph import VOp
from .act import PROBE
from .affine import place_add, select
from .elementwise import AddC

__all__ = ["Norm", "norm_core"]


class Norm(VOp):
    kind = "norm"

    @staticmethod
    def match(fz, v, node):
        if node.op in ("LayerNormalization", "RMSNormalization") and v != node.outputs[0]:
            return None  # LayerNormalization's Mean (affine) and InvStdDev outputs
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
        x, eps, kind, head_dim = core
        return _norm_heads(fz, v, node, x, np.ones(fz.ix.numel(v)), eps, kind, head_dim)

    def reference(self, ins, step):
        hd = self.attrs.get("head_dim", 0) or ins[0].size
        x = np.split(ins[0], range(hd, ins[0].size, hd))
        if self.attrs["kind"] == "layer":
            x = [h - h.mean() for h in x]
        y = np.concatenate([h / np.sqrt(np.mean(h * h) + self.attrs["eps"]) for h in x])
        return y * step.og.consts[self.attrs["gain"]]

    def emit(self, cg, src):
        n = cg.lengths[self.out]
        g = cg.load_const(self.attrs["gain"], n)
        eps_m, eps_e = _eps_imm(self.attrs["eps"])
        dst = cg.vector(self.out)
        cg.instr("NORM", x=src[0][0], x_e=src[0][1], g=g[0], g_e=g[1], dst=dst[0], dst_e=dst[1], len=n,
                 eps_m=eps_m, eps_e=eps_e, kind=isa.ENUMS["norm"].index(self.attrs["kind"]),
                 head_dim=self.attrs.get("head_dim", 0))


def _norm_heads(fz, v, node, x, gain, eps, kind, head_dim):
    """The norm of *x* with the gain vector *gain* of *v*'s length, over the whole vector (*head_dim* None) or over
    each head: one NORM with ``head_dim`` where the vector unit walks the heads chunk by chunk (and is built to), else
    a row each."""
    n = fz.ix.numel(v)
    whole = head_dim is None or head_dim == n
    if whole or (fz.norm_heads and (fz.lanes is None or head_dim % fz.lanes == 0)
                 and n <= isa.NORM_MAX_HEADS * head_dim):
        g = fz.store(fz.out.consts, "c", gain)  # stored before x's ops, as it always was
        heads = {} if whole else {"head_dim": head_dim}
        return fz.add(Norm, v, [fz.vector(x)], node.name, gain=g, eps=eps, kind=kind, **heads)
    xv = fz.vector(x)
    gains = [fz.store(fz.out.consts, "c", gain[lo:lo + head_dim].copy()) for lo in range(0, n, head_dim)]
    return _rows(fz, v, node, xv, gains, head_dim, eps, kind)


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
    x, eps, kind, head_dim = core
    c = fz.ix.const(gain).astype(np.float64).reshape(-1)
    if head_dim is None:
        g = fz.const_vector(gain, n)
        return fz.add(Norm, v, [fz.vector(x)], node.name, gain=g, eps=eps, kind=kind)
    if c.size not in (head_dim, n):  # size 1 left this rule above
        fz.fail(v, f"has a gain of {c.size} elements for heads of {head_dim}")
    return _norm_heads(fz, v, node, x, np.resize(c, n), eps, kind, head_dim)


def _eps_imm(eps: float) -> tuple[int, int]:
    """NORM's (eps_m, eps_e): eps as a 16-bit mantissa times a power of two."""
    e = math.frexp(eps)[1] - 16
    return round(eps * 2.0 ** -e), e


def _norm_op(fz, v, node, x, scale, bias, kind, eps):
    shp = fz.ix.shape(x)
    axis = node.attrs.get("axis", -1) % len(shp)
    if not fz.ix.is_const(scale):
        fz.fail(v, "has a computed scale")
    if any(d != 1 for d in shp[:axis]) or axis != len(shp) - 1:
        return norm_rows(fz, v, node, x, scale, bias, kind, eps, axis)
    n = fz.ix.numel(v)
    g = fz.const_vector(scale, n)
    y = fz.add(Norm, v, [fz.vector(x)], node.name, gain=g, eps=eps, kind=kind)
    if bias is not None:
        y = fz.add(AddC, v, [y], node.name, const=fz.const_vector(bias, n))
    return y


def norm_rows(fz, v, node, x, scale, bias, kind, eps, axis):
    """A norm over the axes from *axis* on, of each row (the leading axes): every row is selected into a
    vector of its own, normalized, and the rows are put back in place by 0/1 GEMVs (``affine``)."""
    shp = fz.ix.shape(x)
    m = int(np.prod(shp[axis:]))
    rows = fz.ix.numel(x) // m
    gain = np.broadcast_to(fz.ix.const(scale).astype(np.float64), shp[axis:]).reshape(-1)
    g = fz.store(fz.out.consts, "c", gain.copy())
    y = _rows(fz, v, node, fz.vector(x), [g] * rows, m, eps, kind)
    if bias is not None:
        b = np.broadcast_to(fz.ix.const(bias).astype(np.float64), shp[axis:]).reshape(-1)
        y = fz.add(AddC, v, [y], node.name, const=fz.store(fz.out.consts, "c", np.tile(b, rows)))
    return y


def _rows(fz, v, node, xv, gains, m, eps, kind):
    """Each of the ``len(gains)`` rows of *m* elements of vector *xv* selected into a vector of its own, normalized
    with its stored gain, and put back in place by 0/1 GEMVs (``affine``)."""
    rows = len(gains)
    if rows == 1:  # the whole tensor is one vector
        return fz.add(Norm, v, [xv], node.name, gain=gains[0], eps=eps, kind=kind)
    y = None
    for r, g in enumerate(gains):
        at = np.arange(r * m, (r + 1) * m)
        yr = fz.add(Norm, v, [select(fz, v, node, xv, at)], node.name, gain=g, eps=eps, kind=kind)
        fz.out.lengths[yr] = m
        place = np.zeros((rows * m, m))
        place[at, np.arange(m)] = 1.0
        y = place_add(fz, v, node, y, place, yr)
    return y


def norm_core(fz, v):
    """RMSNorm without gain spelled out: x * rsqrt(mean(x^2) + eps) or x / sqrt(mean(x^2) + eps), over the whole
    vector or over each head (a mean over the last axis of several heads): (x, eps, "rms", head_dim or None)."""
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
        if leaf is None:
            continue
        if fz.ix.resolve(leaf) != fz.ix.resolve(x):
            # the region may reach past x (Gemma's first norm reads the embedding times sqrt(hidden)):
            # x must then cut every path back from the square
            if not fz.ix.elementwise_of(sq, x):
                continue
            leaf = x
        if not np.allclose(fz.ix.probe(sq, leaf, PROBE), PROBE ** 2, rtol=1e-5, atol=1e-6):
            continue
        heads, head_dim = fz.ix.numel(mean), None
        if heads != 1:  # a mean per head: over the last axis, which the other axes index
            shp = fz.ix.shape(sq)
            axes = fz.ix.const(mnode.inputs[1]) if len(mnode.inputs) > 1 and mnode.inputs[1] else None
            axes = mnode.attrs.get("axes") if axes is None else axes.reshape(-1).tolist()
            if axes is None or [a % len(shp) for a in axes] != [len(shp) - 1] or heads * shp[-1] != fz.ix.numel(x):
                continue
            head_dim = shp[-1]
        ts = np.array([0.0, 0.01, 0.5, 2.0, 37.0])
        f = fz.ix.probe(r, mean, ts)
        if node.op == "Mul":
            eps = 1.0 / f[0] ** 2 if f[0] > 0 else -1
            want = 1.0 / np.sqrt(ts + eps)
        else:
            eps = f[0] ** 2
            want = np.sqrt(ts + eps)
        if eps > 0 and np.allclose(f, want, rtol=1e-4):
            return x, float(np.float32(eps)), "rms", head_dim
    return None
