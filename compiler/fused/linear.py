"""``linear``: a GEMV, MatMul/Gemm by a constant matrix (out x in), or one part of a Split of a GEMV's
output (the GEMV split by rows instead); a bias becomes an ``addc``."""

from __future__ import annotations

import numpy as np

from ..frontend import CompileError
from ..overlay_graph import VOp
from .elementwise import AddC

__all__ = ["Linear"]


class Linear(VOp):
    kind = "linear"

    @staticmethod
    def match(fz, v, node):
        if node.op in ("MatMul", "Gemm"):
            return _linear(fz, v, node)
        if node.op == "Split":
            return _split(fz, v, node)
        return None

    def reference(self, ins, step):
        return step.og.matrices[self.attrs["matrix"]] @ ins[0]

    def emit(self, cg, src):
        m = cg.records[self.attrs["matrix"]]
        if m.rows > cg.acc_rows:
            raise CompileError(f"{cg.who}: {m.rows} output rows exceed the accumulator buffer "
                               f"({cg.acc_rows} words free on {cg.cfg.name})")
        acc_e = cg.eregs.alloc(cg.who)
        cg.instr("GEMV", addr=m.addr, rows=m.rows, cols=m.cols, **m.format_fields(), x=src[0][0], x_e=src[0][1],
                 acc=0, acc_e=acc_e, accumulate=0)
        dst = cg.vector(self.out)
        cg.instr("REQ", acc=0, acc_e=acc_e, len=m.rows, dst=dst[0], dst_e=dst[1])
        cg.eregs.release(acc_e)


def _linear(fz, v, node) -> str:
    a, b = node.inputs[0], node.inputs[1]
    w = fz.ix.const(b)
    if w is None or fz.ix.is_const(a):
        fz.fail(v, "multiplies two computed tensors outside a recognised attention")
    if w.ndim != 2:
        fz.fail(v, f"has a weight of rank {w.ndim}; the overlay's GEMV takes 2-D weights")
    w, bias = _weight(fz, v, node)
    k, n = w.shape
    x = fz.vector(a)
    if fz.out.lengths[x] != k:
        fz.fail(v, f"multiplies a vector of {fz.out.lengths[x]} by a {k}x{n} matrix")
    mat = fz.store(fz.out.matrices, "w", w.T)
    y = fz.add(Linear, v, [x], node.name, matrix=mat)
    if bias is not None:
        y = fz.add(AddC, v, [y], node.name, const=fz.store(fz.out.consts, "c", bias.copy()))
    return y


def _weight(fz, v, node):
    """([K, N] weight, [N] bias or None) of a MatMul or Gemm by a constant matrix."""
    w, bias = fz.ix.const(node.inputs[1]), None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            fz.fail(v, "with transA=1 is not supported")
        w = w.T if node.attrs.get("transB", 0) else w
        if float(node.attrs.get("alpha", 1.0)) != 1.0:  # no copy of the weights for the common alpha = 1
            w = w * float(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2]:
            c = fz.ix.const(node.inputs[2])
            if c is None:
                fz.fail(v, "has a computed bias")
            bias = np.broadcast_to(c.reshape(-1) * float(node.attrs.get("beta", 1.0)), (w.shape[1],))
    return w, bias


def _split(fz, v, node) -> str:
    """Split of a GEMV output along its features: the GEMV is split by rows instead."""
    src = node.inputs[0]
    shp = fz.ix.shape(src)
    axis = node.attrs.get("axis", 0) % len(shp)
    if any(d != 1 for i, d in enumerate(shp) if i != axis):
        fz.fail(v, "splits along a unit axis pattern the overlay does not support")
    sizes = [fz.ix.numel(o) for o in node.outputs]
    k = node.outputs.index(v)
    lo = sum(sizes[:k])
    linear, bias = _split_source(fz, src)
    if linear is None:
        fz.fail(v, "splits a vector that is not the output of a constant-matrix product")
    lnode = fz.ix.producer[linear]
    w, gemm_bias = _weight(fz, v, lnode)
    bias = gemm_bias if gemm_bias is not None else bias
    x = fz.vector(lnode.inputs[0])
    mat = fz.store(fz.out.matrices, "w", w.T[lo:lo + sizes[k]])
    y = fz.add(Linear, v, [x], lnode.name, matrix=mat)
    if bias is not None:
        cname = fz.store(fz.out.consts, "c", np.asarray(bias, np.float64)[lo:lo + sizes[k]].copy())
        y = fz.add(AddC, v, [y], node.name, const=cname)
    return y


def _split_source(fz, src):
    """(GEMV output value, bias array or None) behind a split vector."""
    r = fz.ix.resolve(src)
    node = fz.ix.producer.get(r)
    bias = None
    if node is not None and node.op == "Add" and len(node.inputs) == 2:
        for i, j in ((0, 1), (1, 0)):
            c = fz.ix.const(node.inputs[j])
            if c is not None and not fz.ix.is_const(node.inputs[i]):
                bias, r = c.reshape(-1), fz.ix.resolve(node.inputs[i])
                node = fz.ix.producer.get(r)
                break
    if node is not None and node.op in ("MatMul", "Gemm") and fz.ix.is_const(node.inputs[1]):
        if bias is not None:
            bias = np.broadcast_to(bias, (fz.ix.numel(r),))
        return r, bias
    return None, None
