"""``rope``: ``x*cos + rotate_half(x)*sin`` or ``RotaryEmbedding``; cos and sin are position tables of
half a head, read by one LDROW each per step and shared by every layer's q and k. Rotary on part of each
head (``cat(rope(x[..., :r]), x[..., r:])``) reorders the GEMV that makes x instead (see ``_partial_rope``)."""

from __future__ import annotations

import numpy as np

from kvoverlay import isa

from ..frontend import CompileError
from ..overlay_graph import VOp
from .linear import gemv_rows, selected_rows
from .table import table_row

__all__ = ["Rope"]


class Rope(VOp):
    kind = "rope"

    @staticmethod
    def match(fz, v, node):
        if node.op == "RotaryEmbedding":
            # at constant positions it is a fixed linear map of x, which the affine rule (Place) measures
            return None if constant_positions(fz, node) else _rope_op(fz, v, node)
        if node.op == "Concat":
            return _partial_rope(fz, v, node)
        parts = _rope_parts(fz, node)
        return None if parts is None else _add_rope(fz, v, node, *parts)

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


def _rope_parts(fz, node):
    """(x, cos, sin, head dim) if *node* is Add(x * cos, rotate_half(x) * sin), in any operand order."""
    if node is None or node.op != "Add" or len(node.inputs) != 2:
        return None
    for i, j in ((0, 1), (1, 0)):
        m1, m2 = fz.ix.node_of(node.inputs[i]), fz.ix.node_of(node.inputs[j])
        if m1 is None or m2 is None or m1.op != "Mul" or m2.op != "Mul":
            continue
        for xi in (0, 1):
            x, cos = m1.inputs[xi], m1.inputs[1 - xi]
            for ri in (0, 1):
                rot, sin = m2.inputs[ri], m2.inputs[1 - ri]
                d = _rotate_half(fz, rot, x)
                if d is not None:
                    return x, cos, sin, d
    return None


def _last_axis_slice(fz, value):
    """(source, start, end) if *value* is a step-1 Slice of the last axis, bounds clamped, else None."""
    sl = fz.ix.node_of(value)
    if sl is None or sl.op != "Slice":
        return None
    shp = fz.ix.shape(sl.inputs[0])
    starts, ends = fz.ix.const(sl.inputs[1]), fz.ix.const(sl.inputs[2])
    axes = fz.ix.const(sl.inputs[3]) if len(sl.inputs) > 3 and sl.inputs[3] else None
    steps = fz.ix.const(sl.inputs[4]) if len(sl.inputs) > 4 and sl.inputs[4] else None
    if starts is None or ends is None or starts.size != 1 or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        return None
    if axes is not None and int(axes.reshape(-1)[0]) % len(shp) != len(shp) - 1:
        return None
    if axes is None and len(shp) != 1:
        return None
    d = shp[-1]
    bounds = [int(b.reshape(-1)[0]) for b in (starts, ends)]
    s, e = (min(max(b + d if b < 0 else b, 0), d) for b in bounds)
    return fz.ix.resolve(sl.inputs[0]), s, e


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


def _half_table(fz, value, d, pad=0, fill=0.0):
    """The rotary table behind *value*: rows of d/2 (HF tables repeat the half: cat(freqs, freqs)), each
    followed by *pad* times *fill*."""
    tables = fz.memo.setdefault("rope_half_tables", {})
    key = (fz.ix.resolve(value), d, pad, fill)
    if key not in tables:
        rows = _half_rows(fz, value, d)
        if rows is not None and pad:
            rows = np.concatenate([rows, np.full((rows.shape[0], pad), fill, rows.dtype)], axis=1)
        tables[key] = None if rows is None else fz.store_table("position", rows)
    return tables[key]


def _half_rows(fz, value, d):
    deps = fz.ix.deps.get(value, frozenset())
    if fz.ix.is_const(value) and not fz.ix.past_derived(value):
        c = fz.ix.const(value).reshape(-1)
        if c.size != d or not np.array_equal(c[: d // 2], c[d // 2:]):
            return None
        return np.tile(c[: d // 2], (fz.max_seq, 1))
    if deps != {"position_ids"} and not fz.ix.past_derived(value):
        return None
    rows = fz.over_positions(value)
    if rows.shape[1] != d or not np.array_equal(rows[:, : d // 2], rows[:, d // 2:]):
        return None
    return rows[:, : d // 2]


def _add_rope(fz, v, node, x, cos, sin, d):
    ct, st = _half_table(fz, cos, d), _half_table(fz, sin, d)
    if ct is None or st is None:
        fz.fail(v, "looks like a rotary embedding, but its cos/sin are not tables of the position")
    n = fz.ix.numel(v)
    xv = fz.vector(x)
    c, s = table_row(fz, ct, node.name), table_row(fz, st, node.name)
    return fz.add(Rope, v, [xv, c, s], node.name, heads=n // d, head_dim=d, mode="half")


def _partial_rope(fz, v, node):
    """Concat(rope(x[..., :r]), x[..., r:]) along the last axis: rotary on the first r of each head's d elements.

    ROPE rotates pairs (j, j + d/2) of a whole head. So the GEMV making x is reordered within each head to
    [rotated first half, kept first half, rotated second half, kept second half]: the rotated pairs are then
    the head's halves, and the kept ones are rotated by cos 1 and sin 0. The vector holds every head permuted
    the same way, which leaves q.k unchanged; only attention may read it (checked after fusion).
    """
    if len(node.inputs) != 2:
        return None
    shp = fz.ix.shape(v)
    if node.attrs.get("axis", 0) % len(shp) != len(shp) - 1:
        return None
    d = shp[-1]
    parts = _rope_parts(fz, fz.ix.node_of(node.inputs[0]))
    if parts is None:
        return None
    x_rot, cos, sin, r = parts
    rot, kept = _last_axis_slice(fz, x_rot), _last_axis_slice(fz, node.inputs[1])
    if rot is None or kept is None or rot[0] != kept[0] or rot[1:] != (0, r) or kept[1:] != (r, d) or (d - r) % 2:
        return None
    x = rot[0]
    half, keep = r // 2, (d - r) // 2
    ct, st = _half_table(fz, cos, r, keep, 1.0), _half_table(fz, sin, r, keep, 0.0)
    if ct is None or st is None:
        fz.fail(v, "looks like a partial rotary embedding, but its cos/sin are not tables of the position")
    perm = np.concatenate([np.arange(half), r + np.arange(keep), half + np.arange(half), r + keep + np.arange(keep)])
    heads = fz.ix.numel(v) // d
    xn = fz.ix.node_of(x)
    src, rows = selected_rows(fz, x, xn) if xn is not None and xn.op in ("Split", "Slice") else (x, slice(None))
    rows = np.arange(fz.ix.numel(src))[rows]
    xv = gemv_rows(fz, x, src, rows[(d * np.arange(heads)[:, None] + perm).reshape(-1)], node.name)
    c, s = table_row(fz, ct, node.name), table_row(fz, st, node.name)
    y = fz.add(Rope, v, [xv, c, s], node.name, heads=heads, head_dim=d, mode="half")
    if not fz.memo.get("head_permuted"):
        fz.checks.append(_only_scores_read_permuted)
    fz.memo.setdefault("head_permuted", set()).add(y)
    return y


def _only_scores_read_permuted(fz):
    """Vectors with permuted heads may only be attention's queries or keys (inputs 0 and 1)."""
    permuted = fz.memo["head_permuted"]
    for op in fz.out.ops:
        for i, name in enumerate(op.ins):
            if name in permuted and not (op.kind == "attn" and i in (0, 1)):
                raise CompileError(f"{op.source}: reads a partially rotated vector ({name}) other than as attention's"
                                   " query or key, which the overlay does not support")
    for o, (vec, _) in fz.out.outputs.items():
        if vec in permuted:
            raise CompileError(f"output {o!r} is a partially rotated vector, which the overlay does not support")


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


def constant_positions(fz, node) -> bool:
    """Whether a RotaryEmbedding node rotates by constant positions (none given: the sequence's own)."""
    ins = node.inputs
    return len(ins) < 4 or not ins[3] or fz.ix.is_const(ins[3])
