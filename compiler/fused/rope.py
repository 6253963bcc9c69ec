"""``rope``: ``x*cos + rotate_half(x)*sin`` or ``RotaryEmbedding``; cos and sin are position tables of
half a head, read by one LDROW each per step and shared by every layer's q and k."""

from __future__ import annotations

import numpy as np

from kvoverlay import isa

from ..overlay_graph import VOp
from .table import table_row

__all__ = ["Rope"]


class Rope(VOp):
    kind = "rope"

    @staticmethod
    def match(fz, v, node):
        if node.op == "RotaryEmbedding":
            return _rope_op(fz, v, node)
        if node.op != "Add" or len(node.inputs) != 2:
            return None
        for i, j in ((0, 1), (1, 0)):
            m1, m2 = fz.ix.node_of(node.inputs[i]), fz.ix.node_of(node.inputs[j])
            if m1 is None or m2 is None or m1.op != "Mul" or m2.op != "Mul":
                continue
            for xi in (0, 1):
                x, cos = m1.inputs[xi], m1.inputs[1 - xi]
                for ri in (0, 1):
                    rot, sin = m2.inputs[ri], m2.inputs[1 - ri]
                    got = _rotate_half(fz, rot, x)
                    if got is None:
                        continue
                    return _add_rope(fz, v, node, x, cos, sin, got)
        return None

    def reference(self, ins, step):
        h, d = self.attrs["heads"], self.attrs["head_dim"]
        x = ins[0].reshape(h, d)
        c, s = ins[1], ins[2]
        if self.attrs["mode"] == "half":
            x1, x2 = x[:, : d // 2], x[:, d // 2:]
            return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=1).reshape(-1)
        y = np.empty_like(x)
        y[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
        y[:, 1::2] = x[:, 1::2] * c + x[:, 0::2] * s
        return y.reshape(-1)

    def emit(self, cg, src):
        dst = cg.vector(self.out)
        cg.instr("ROPE", x=src[0][0], x_e=src[0][1], cos=src[1][0], cos_e=src[1][1], sin=src[2][0], sin_e=src[2][1],
                 dst=dst[0], dst_e=dst[1], heads=self.attrs["heads"], head_dim=self.attrs["head_dim"],
                 mode=isa.ENUMS["rope"].index(self.attrs["mode"]))


def _rotate_half(fz, rot, x):
    """Head dim if *rot* is Concat(-x[..., d/2:], x[..., :d/2]) along the last axis."""
    cat = fz.ix.node_of(rot)
    if cat is None or cat.op != "Concat" or len(cat.inputs) != 2:
        return None
    shp = fz.ix.shape(x)
    if cat.attrs.get("axis") % len(shp) != len(shp) - 1:
        return None
    d = shp[-1]
    neg = fz.ix.node_of(cat.inputs[0])
    if neg is None or neg.op != "Neg":
        return None
    hi, lo = fz.ix.node_of(neg.inputs[0]), fz.ix.node_of(cat.inputs[1])
    for sl, want in ((hi, (d // 2, d)), (lo, (0, d // 2))):
        if sl is None or sl.op != "Slice" or fz.ix.resolve(sl.inputs[0]) != fz.ix.resolve(x):
            return None
        starts, ends = fz.ix.const(sl.inputs[1]), fz.ix.const(sl.inputs[2])
        axes = fz.ix.const(sl.inputs[3]) if len(sl.inputs) > 3 and sl.inputs[3] else None
        if starts is None or ends is None or starts.size != 1:
            return None
        if axes is not None and int(axes.reshape(-1)[0]) % len(shp) != len(shp) - 1:
            return None
        s, e = int(starts.reshape(-1)[0]), min(int(ends.reshape(-1)[0]), d)
        if (s, e) != want:
            return None
    return d


def _half_table(fz, value, d):
    """The rotary table behind *value*: rows of d/2 (HF tables repeat the half: cat(freqs, freqs))."""
    tables = fz.memo.setdefault("rope_half_tables", {})
    key = (fz.ix.resolve(value), d)
    if key not in tables:
        tables[key] = _half_table_uncached(fz, value, d)
    return tables[key]


def _half_table_uncached(fz, value, d):
    deps = fz.ix.deps.get(value, frozenset())
    if fz.ix.is_const(value):
        c = fz.ix.const(value).reshape(-1)
        if c.size != d or not np.array_equal(c[: d // 2], c[d // 2:]):
            return None
        return fz.store_table("position", np.tile(c[: d // 2], (fz.max_seq, 1)))
    if deps != {"position_ids"}:
        return None
    rows = fz.over_positions(value)
    if rows.shape[1] != d or not np.array_equal(rows[:, : d // 2], rows[:, d // 2:]):
        return None
    return fz.store_table("position", rows[:, : d // 2])


def _add_rope(fz, v, node, x, cos, sin, d):
    ct, st = _half_table(fz, cos, d), _half_table(fz, sin, d)
    if ct is None or st is None:
        fz.fail(v, "looks like a rotary embedding, but its cos/sin are not tables of the position")
    n = fz.ix.numel(v)
    xv = fz.vector(x)
    c, s = table_row(fz, ct, node.name), table_row(fz, st, node.name)
    return fz.add(Rope, v, [xv, c, s], node.name, heads=n // d, head_dim=d, mode="half")


def _rope_op(fz, v, node):
    x, cos_cache, sin_cache = node.inputs[:3]
    pos = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    if pos is None or fz.ix.resolve(pos) != "position_ids":
        fz.fail(v, "needs position_ids as its position input")
    if node.attrs.get("rotary_embedding_dim", 0):
        fz.fail(v, "with partial rotation (rotary_embedding_dim) is not supported")
    cc, sc = fz.ix.const(cos_cache), fz.ix.const(sin_cache)
    if cc is None or sc is None:
        fz.fail(v, "needs constant cos/sin caches")
    half = cc.shape[-1]
    d = 2 * half
    n = fz.ix.numel(v)
    if cc.shape[0] < fz.max_seq:
        fz.fail(v, f"has a cos cache of {cc.shape[0]} positions, fewer than max_seq={fz.max_seq}")
    ct = fz.store_table("position", cc[: fz.max_seq].reshape(fz.max_seq, half))
    st = fz.store_table("position", sc[: fz.max_seq].reshape(fz.max_seq, half))
    xv = fz.vector(x)
    c, s = table_row(fz, ct, node.name), table_row(fz, st, node.name)
    mode = "interleaved" if node.attrs.get("interleaved", 0) else "half"
    return fz.add(Rope, v, [xv, c, s], node.name, heads=n // d, head_dim=d, mode=mode)
