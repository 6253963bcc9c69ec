"""Pre-quantized int4 imported as given: ``com.microsoft.MatMulNBits`` becomes a MatMul by a float matrix that
remembers its quantized form.

onnxruntime's ``MatMulNBitsQuantizer`` and the onnxruntime-genai model builder write a quantized MatMul as
``MatMulNBits(A, B, scales[, zero_points[, g_idx[, bias]]])`` with attributes ``K``, ``N``, ``bits`` and
``block_size``: B holds, per output column n and block of ``block_size`` inputs, the unsigned 4-bit q packed two
to a byte (low nibble first), scales one float per (n, block), and zero points 4-bit unsigned per (n, block),
packed like B per n; without them every zero point is 8. The weight is ``(q - z) * scale``.

:func:`import_matmul_nbits` rewrites each such node, before the model is checked, into ``MatMul(A, W)`` with W
the float32 weight onnxruntime computes, and records W's :class:`Prequantized` form. The fused graph keeps that
form beside the matrix (:attr:`OverlayGraph.prequantized`), and ``quantize`` places it as is: uint4 with its
zero points, or int4 (q - 8) without; only the float scales are rounded, to 12 (uint4) or 16 (int4) bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .frontend import CompileError

__all__ = ["BLOCK_SIZES", "Prequantized", "import_matmul_nbits"]

DOMAIN = "com.microsoft"
#: Block sizes taken: powers of two from onnxruntime's smallest to the largest the tests cover.
BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class Prequantized:
    """A matrix [rows = N outputs, cols = K inputs] as 4-bit codes: q [rows, cols] in [0, 15], float scales and
    zero points (None: symmetric, every zero point 8) [rows, cols // block]."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block: int

    @property
    def fmt(self) -> str:
        """The overlay weight format that holds it unchanged."""
        return "int4" if self.zero_points is None else "uint4"

    def rows(self, sel) -> Prequantized:
        """The rows *sel* (a slice or an index array), as a Split or Slice of the GEMV's output takes them."""
        zp = None if self.zero_points is None else self.zero_points[sel]
        return Prequantized(self.q[sel], self.scales[sel], zp, self.block)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix [rows, cols], computed as onnxruntime does: (q - z) * scale."""
        rows, cols = self.q.shape
        z = np.full(self.scales.shape, 8, np.float32) if self.zero_points is None else self.zero_points.astype(np.float32)
        qg = self.q.reshape(rows, -1, self.block).astype(np.float32)
        return ((qg - z[..., None]) * self.scales.astype(np.float32)[..., None]).reshape(rows, cols)


def _nibbles(packed: np.ndarray, rows: int, count: int) -> np.ndarray:
    """Unsigned 4-bit values [rows, count] from bytes packed per row, low nibble first."""
    b = np.asarray(packed, np.uint8).reshape(rows, -1)
    out = np.empty((rows, 2 * b.shape[1]), np.uint8)
    out[:, 0::2], out[:, 1::2] = b & 0xF, b >> 4
    return out[:, :count]


def _decode(node: onnx.NodeProto, name: str, arrays: dict) -> Prequantized:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    who = f"node {name}: MatMulNBits"
    bits, block = attrs.get("bits", 4), attrs.get("block_size")
    if bits != 4:
        raise CompileError(f"{who} with bits={bits} is not supported; supported: bits=4")
    if block not in BLOCK_SIZES:
        raise CompileError(f"{who} with block_size={block} is not supported; supported: "
                           + ", ".join(map(str, BLOCK_SIZES)))
    k, n = attrs.get("K"), attrs.get("N")
    if k is None or n is None:
        raise CompileError(f"{who} lacks its K or N attribute")
    groups = -(-k // block)
    if k % block and groups > 1:
        raise CompileError(f"{who} has K={k}, not a multiple of block_size={block}")
    ins = list(node.input) + [""] * (6 - len(node.input))
    if ins[4]:
        raise CompileError(f"{who} with g_idx (act-order) is not supported")
    consts = {}
    for role, i in (("B", ins[1]), ("scales", ins[2]), ("zero_points", ins[3]), ("bias", ins[5])):
        if i and i not in arrays:
            raise CompileError(f"{who}: {role} {i!r} is computed, not an initializer")
        consts[role] = arrays.get(i) if i else None
    if consts["B"].dtype != np.uint8 or consts["B"].size != n * groups * block // 2:
        raise CompileError(f"{who}: B is {consts['B'].dtype}{list(consts['B'].shape)}, expected uint8 "
                           f"[{n}, {groups}, {block // 2}]")
    q = _nibbles(consts["B"], n, k)  # a single block longer than K is padded: its group is the K weights
    scales = np.asarray(consts["scales"], np.float32)
    if scales.size != n * groups or not np.all(np.isfinite(scales)):
        raise CompileError(f"{who}: scales are {scales.dtype}{list(scales.shape)}; expected {n * groups} finite values")
    scales = scales.reshape(n, groups)
    zp = consts["zero_points"]
    if zp is not None:
        if zp.dtype != np.uint8:
            raise CompileError(f"{who}: zero points of type {zp.dtype} are not supported; supported: packed uint8")
        zp = _nibbles(zp, n, groups)
    neg = scales < 0
    if np.any(neg):
        # onnxruntime's symmetric quantizer gives a group the signed value of its largest magnitude / -8, so
        # scales may be negative; (q - z) * s = ((15 - q) - (15 - z)) * -s keeps every weight and makes it uint4
        zp = np.full(scales.shape, 8, np.uint8) if zp is None else zp
        q = np.where(np.repeat(neg, min(block, k), axis=1), 15 - q, q).astype(np.uint8)
        zp = np.where(neg, 15 - zp, zp).astype(np.uint8)
        scales = np.abs(scales)
    return Prequantized(q, scales, zp, min(block, k)), consts["bias"]


def import_matmul_nbits(model: onnx.ModelProto, weights: dict) -> dict:
    """Rewrite every MatMulNBits of *model* in place into MatMul (plus Add for a bias) by a new float32 initializer,
    kept in *weights*; the quantized initializers no other node reads are dropped. Returns {initializer name:
    :class:`Prequantized`} for the new weights (stored as [K, N], the Prequantized form is [N, K])."""
    g = model.graph
    if not any(node.op_type == "MatMulNBits" and node.domain == DOMAIN for node in g.node):
        return {}
    arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    arrays.update(weights)
    found, nodes, dropped = {}, [], set()
    for i, node in enumerate(g.node):
        if not (node.op_type == "MatMulNBits" and node.domain == DOMAIN):
            nodes.append(node)
            continue
        name = node.name or f"MatMulNBits_{i}"
        pre, bias = _decode(node, name, arrays)
        w = f"{node.input[1]}.dequantized"
        weights[w] = np.ascontiguousarray(pre.dequantize().T)
        found[w] = pre
        dropped |= {x for x in node.input[1:] if x}
        if bias is None:
            nodes.append(helper.make_node("MatMul", [node.input[0], w], [node.output[0]], name=name))
        else:
            mid, b = f"{node.output[0]}.unbiased", f"{node.input[5]}.bias"
            weights[b] = np.asarray(bias, np.float32)
            nodes += [helper.make_node("MatMul", [node.input[0], w], [mid], name=name),
                      helper.make_node("Add", [mid, b], [node.output[0]], name=f"{name}.bias")]
    del g.node[:]
    g.node.extend(nodes)
    dropped -= {x for node in nodes for x in node.input}
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name in dropped:
            del g.initializer[i]
    for name in dropped & set(weights):
        del weights[name]
    return found
