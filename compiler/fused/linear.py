"""``linear``: a GEMV, MatMul/Gemm by a constant matrix (out x in), or one part of a Split or Slice of a
GEMV's output (the GEMV split by rows instead); a bias becomes an ``addc``."""

from __future__ import annotations

import numpy as np

from ..codegen import REG_NEXT
from ..frontend import CompileError
from ..onnx_ops import evaluate
from ..overlay_graph import VOp
from .elementwise import AddC

__all__ = ["Linear", "Requant", "gemv_rows", "selected_rows"]


class Linear(VOp):
    kind = "linear"

    @staticmethod
    def match(fz, v, node):
        if node.op in ("MatMul", "Gemm"):
            return _linear(fz, v, node)
        if node.op in ("Split", "Slice"):
            return gemv_rows(fz, v, *selected_rows(fz, v, node), node.name)
        return None

    def reference(self, ins, step):
        return step.og.matrices[self.attrs["matrix"]] @ ins[0]

    def emit(self, cg, src):
        m = cg.records[self.attrs["matrix"]]
        if cg.head_tiles and self.out == cg.og.logits:
            _emit_head_tiles(cg, m, src[0])
            return
        if m.rows > cg.acc_rows:
            raise CompileError(f"{cg.who}: {m.rows} output rows exceed the accumulator buffer "
                               f"({cg.acc_rows} words free on {cg.cfg.name})")
        acc_e = cg.eregs.alloc(cg.who)
        acc = cg.acc.alloc(m.rows, cg.who)
        cg.instr("GEMV", addr=m.addr, rows=m.rows, cols=m.cols, **m.gemv_fields(), x=src[0][0], x_e=src[0][1],
                 acc=acc, acc_e=acc_e, accumulate=0)
        if self.attrs.get("defer"):  # a Requant of this op's output emits the REQ (compiler.split_attention)
            cg.pend(self.out, acc, acc_e, m.rows)
            return
        dst = cg.vector(self.out)
        cg.instr("REQ", acc=acc, acc_e=acc_e, len=m.rows, dst=dst[0], dst_e=dst[1])
        cg.acc.release(acc, m.rows)
        cg.eregs.release(acc_e)


class Requant(VOp):
    """``req``: the REQ of a GEMV emitted earlier (a :class:`Linear` with ``defer``, whose output names the
    pending accumulators), so that other GEMVs can stream in between (compiler.split_attention)."""

    kind = "req"

    def reference(self, ins, step):
        return ins[0]

    def emit(self, cg, src):
        acc, acc_e = src[0]
        dst = cg.vector(self.out)
        cg.instr("REQ", acc=acc, acc_e=acc_e, len=cg.lengths[self.out], dst=dst[0], dst_e=dst[1])


def _emit_head_tiles(cg, m, x) -> None:
    """The LM head in tiles of the accumulator buffer (``cg.head_tiles``): per tile a GEMV of its rows into one half
    of the buffer and a REQ into one of two vectors, in turn, then in the store queue ARGMAXACC, chained from the
    first tile on into the next-token register, and the STORE of the tile's logits record; so a tile's ARGMAXACC
    and STORE run beside the next tile's GEMV. A program without logits keeps the GEMVs and the ARGMAXACC chain."""
    acc_e = cg.eregs.alloc(cg.who)
    size = max(n for _, n, _ in cg.head_tiles)
    stored = cg.head_tiles[0][2] is not None  # --no-logits: no REQ, no STORE
    bufs = [cg.scratch(f"{cg.og.logits}:tile{k}", size) for k in range(min(2, len(cg.head_tiles)) if stored else 0)]
    for k, (r0, n, rec) in enumerate(cg.head_tiles):
        acc = k % 2 * size
        cg.instr("GEMV", addr=m.addr + m.row_offset(r0, cg.cfg.port_bytes), rows=n, cols=m.cols, **m.gemv_fields(),
                 x=x[0], x_e=x[1],
                 acc=acc, acc_e=acc_e, accumulate=0)
        if rec is not None:
            dst = bufs[k % len(bufs)]
            cg.instr("REQ", acc=acc, acc_e=acc_e, len=n, dst=dst[0], dst_e=dst[1])
        cg.instr("ARGMAXACC", acc=acc, len=n, base=r0, rd=REG_NEXT, cont=int(k > 0))
        if rec is not None:
            cg.instr("STORE", src=dst[0], src_e=dst[1], len=n, addr=rec)
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
    _keep_prequantized(fz, node, mat, slice(None))
    y = fz.add(Linear, v, [x], node.name, matrix=mat)
    if bias is not None:
        y = fz.add(AddC, v, [y], node.name, const=fz.store(fz.out.consts, "c", bias.copy()))
    return y


def _keep_prequantized(fz, node, mat, rows):
    """Carry the given quantized form of a MatMul's weight (imported from MatMulNBits) to matrix *mat*."""
    pre = fz.g.prequantized.get(node.inputs[1]) if node.op == "MatMul" else None
    if pre is not None:
        fz.out.prequantized[mat] = pre.rows(rows)


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


def selected_rows(fz, v, node):
    """(source, elements) of output *v* of a Split or Slice: which elements of the flat source vector it holds,
    in order, found by running the node on the element indices (a slice where they are contiguous)."""
    src = node.inputs[0]
    consts = [fz.ix.const(i) if i else None for i in node.inputs[1:]]
    if any(i and c is None for i, c in zip(node.inputs[1:], consts, strict=True)):
        fz.fail(v, "splits or slices with computed bounds")
    index = np.arange(fz.ix.numel(src)).reshape(fz.ix.shape(src))
    outs = evaluate(node, fz.g.opset, [index, *consts])
    rows = outs[node.outputs.index(v)].reshape(-1)
    if rows.size and np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
        return src, slice(int(rows[0]), int(rows[0]) + rows.size)
    return src, rows


def gemv_rows(fz, v, src, rows, source: str) -> str:
    """Rows *rows* (a slice or an index array) of GEMV output *src* (with its bias, if any) as their own GEMV,
    computing value *v*."""
    linear, bias = _split_source(fz, src)
    if linear is None:
        fz.fail(v, "takes part of a vector that is not the output of a constant-matrix product")
    lnode = fz.ix.producer[linear]
    w, gemm_bias = _weight(fz, v, lnode)
    bias = gemm_bias if gemm_bias is not None else bias
    x = fz.vector(lnode.inputs[0])
    mat = fz.store(fz.out.matrices, "w", w.T[rows])
    _keep_prequantized(fz, lnode, mat, rows)
    y = fz.add(Linear, v, [x], lnode.name, matrix=mat)
    if bias is not None:
        cname = fz.store(fz.out.consts, "c", np.asarray(bias, np.float64)[rows].copy())
        y = fz.add(AddC, v, [y], source, const=cname)
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
