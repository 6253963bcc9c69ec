"""``attn_rows``: ONNX ``Attention`` without past KV (Q, K, V are tensors of a small graph), on the KV buffer.

Each query row is one ``ATTN`` over the keys it attends, which it first appends to the op's KV-buffer layer
(``KVAPPEND`` per key; the store queue runs in order, so the next row may overwrite them). The keys come from
the past KV (graph inputs, not a decoder's ``past_key_values.N``) and the new K/V; the rows are cut out of them and
the outputs put back in the output's layout by 0/1 GEMVs (``affine.select``/``assemble``). What a row attends is
the op's own bias (``onnx_ops.attention_bias``: a constant boolean or float mask, ``is_causal`` bottom-right
aligned with the past): masked keys are left out, and a float bias rides in an extra head lane (q gets 1, each
key ``b / scale``, so ATTN's ``scale * q.k`` adds ``b``). Heads that attend different keys, or with different
biases, run one ATTN each. present_key/present_value are the past then the new rows, by 0/1 GEMVs. Sliding
windows, softcap, ``nonpad_kv_seqlen`` and the qk_matmul output are outside the overlay's scope.
"""

from __future__ import annotations

import math

import numpy as np

from kvoverlay import isa

from ..codegen import REG_POSITION, scale_imm
from ..graph_tools import PAST_KV
from ..onnx_ops import attention_bias
from ..overlay_graph import VOp
from .affine import assemble, place_add, select
from .attention import gqa
from .elementwise import AddC

__all__ = ["AttentionRows", "attention_rows"]


class AttentionRows(VOp):
    """One query row (or some of its heads): ins are the queries, then keys and values (k_0, v_0, k_1, v_1, ...)
    that it appends to its layer from position ``first``. With ``attend``, one ATTN over the layer's first
    ``length`` keys gives the output; without, the op only appends and passes its queries on (a copy), so that a
    row's keys are made and appended a few at a time: each key is a vector, and the exponent registers are few."""

    kind = "attn_rows"

    @staticmethod
    def match(fz, v, node):
        return attention_rows(fz, v, node)

    @property
    def stats_words(self) -> int:
        return 2 * self.attrs["q_heads"]

    def reference(self, ins, step):
        a = self.attrs
        qh, kvh, d, n = a["q_heads"], a["kv_heads"], a["head_dim"], a["length"]
        ks, vs = step.kv[a["layer"]]
        del ks[a["first"]:], vs[a["first"]:]
        ks += [k.reshape(kvh, d) for k in ins[1::2]]
        vs += [v.reshape(kvh, d) for v in ins[2::2]]
        if not a["attend"]:
            return ins[0]
        return gqa(ins[0].reshape(qh, d) * a["scale"], np.stack(ks[:n], 1), np.stack(vs[:n], 1))

    def emit(self, cg, src):
        a = self.attrs
        for j in range(len(src) // 2):
            k, v = src[1 + 2 * j], src[2 + 2 * j]
            cg.instr("KVAPPEND", k=k[0], k_e=k[1], v=v[0], v_e=v[1], kv_base=cg.kv_bases[a["layer"]], heads=a["kv_heads"],
                     head_dim=a["head_dim"], pos_reg=REG_POSITION, pos_imm=a["first"] + j)
        n = a["q_heads"] * a["head_dim"]
        if not a["attend"]:
            dst = cg.vector(self.out)
            imm_m, imm_e = scale_imm(1.0, cg.who)
            cg.instr("VSCALE", a=src[0][0], a_e=src[0][1], dst=dst[0], dst_e=dst[1], len=n, imm_m=imm_m, imm_e=imm_e)
            return
        q = cg.scratch(f"qscaled:{self.out}", n)
        imm_m, imm_e = scale_imm(a["scale"], cg.who)
        cg.instr("VSCALE", a=src[0][0], a_e=src[0][1], dst=q[0], dst_e=q[1], len=n, imm_m=imm_m, imm_e=imm_e)
        dst = cg.vector(self.out)
        cg.instr("ATTN", q=q[0], q_e=q[1], dst=dst[0], dst_e=dst[1], kv_base=cg.kv_bases[a["layer"]], q_heads=a["q_heads"],
                 kv_heads=a["kv_heads"], head_dim=a["head_dim"], len_reg=REG_POSITION, len_imm=a["length"],
                 stats=cg.stats_addr if cg.attn_stats else isa.ATTN_NO_STATS)


#: Keys a row makes and appends per op (two vectors each, live until the op).
KEYS_PER_OP = 4


def attention_rows(fz, v, node):
    """The fusion rule: ONNX Attention whose past KV, if any, is not a decoder's ``past_key_values.N`` input (see
    the module docstring)."""
    if node is None or node.op != "Attention":
        return None
    ins = list(node.inputs) + [""] * (7 - len(node.inputs))
    q, k, val, mask, pk, pv, nonpad = ins[:7]
    if pk and PAST_KV.match(pk):
        return None  # a decoder's KV cache: the ``attn`` rule
    outs = list(node.outputs) + [""] * (4 - len(node.outputs))
    if outs[3]:
        fz.fail(v, "has a qk_matmul_output output: the overlay's ATTN keeps the scores on chip")
    if nonpad:
        fz.fail(v, "has a nonpad_kv_seqlen input: per-batch KV lengths are outside the op's scope on the overlay")
    window = [node.attrs.get(a, -1) for a in ("left_window_size", "right_window_size")]
    if any(w is not None and w >= 0 for w in window):
        fz.fail(v, f"uses a sliding window (left/right {window[0]}/{window[1]}): ATTN attends the keys appended to "
                   "its layer, and a window is outside the op's scope on the overlay")
    if node.attrs.get("softcap", 0.0):
        fz.fail(v, "uses softcap: the overlay's ATTN has no tanh cap on the scores")
    if node.attrs.get("softmax_precision") not in (None, 1):
        fz.fail(v, f"has softmax_precision={node.attrs['softmax_precision']}")
    if mask and not fz.ix.is_const(mask):
        fz.fail(v, "has an attention mask that is a runtime input: the keys each query row attends, and their "
                   "biases, are fixed in the program")
    if (pk and not pv) or (pv and not pk):
        fz.fail(v, "has only one of past_key and past_value")
    layout = _layout(fz, v, node, q, k, val)
    b, qh, kvh, sq, skv, hd = layout["dims"]
    past = fz.ix.shape(pk)[2] if pk else 0
    if v in (outs[1], outs[2]):
        return _present(fz, v, node, k if v == outs[1] else val, pk if v == outs[1] else pv, past, kvh)
    if v != outs[0]:
        return None
    total = past + skv
    bias = np.broadcast_to(attention_bias(node.attrs, fz.ix.const(mask) if mask else None, sq, total, past),
                           (b, qh, sq, total))
    scale = _scale(node, layout)
    layer = max(fz.out.kv) + 1 if fz.out.kv else 0
    kv_in = {"k": fz.vector(k), "v": fz.vector(val)}
    past_in = {"k": fz.vector(pk), "v": fz.vector(pv)} if pk else {}
    past_rows = {"k": _past_rows(fz, pk, hd), "v": _past_rows(fz, pv, hd)} if pk else None
    group = qh // kvh
    widest = (0, 0)
    out = None
    for bi in range(b):
        held = None  # (heads, number of keys) the layer holds in order from key 0, for rows that attend a prefix
        for i in range(sq):
            for heads, keys, brow in _groups(bias[bi, :, i, :]):
                kv_heads = sorted({h // group for h in heads})
                with_bias = bool(np.any(brow[keys] != 0.0))
                prefix = not with_bias and np.array_equal(keys, np.arange(len(keys)))
                attend = len(keys)
                if prefix:  # append every key once; this row and the next ones attend a prefix of them
                    if held == (tuple(heads), total):
                        keys = keys[:0]
                    else:
                        keys, held = np.arange(total), (tuple(heads), total)
                else:
                    held = None
                d = hd + (2 if with_bias else 0)  # a bias lane (and a zero lane: head_dim stays even)
                qrows = layout["q"](bi, i).reshape(qh, hd)[heads]
                qi = select(fz, v, node, fz.vector(q), _lanes(qrows, d).reshape(-1))
                if with_bias:  # q.k + b/scale per key, scaled: scale * q.k + b
                    lane = np.zeros((len(heads), d))
                    lane[:, hd] = 1.0
                    qi = fz.add(AddC, v, [qi], node.name, const=fz.store(fz.out.consts, "c", lane.reshape(-1)))
                    fz.out.lengths[qi] = lane.size
                y = qi
                for c0 in range(0, max(len(keys), 1), KEYS_PER_OP):
                    kvs = []
                    for j in keys[c0:c0 + KEYS_PER_OP]:
                        for side in ("k", "v"):
                            src, rows = (kv_in[side], layout[side](bi, j - past)) if j >= past else \
                                (past_in[side], past_rows[side](bi, j))
                            x = select(fz, v, node, src, _lanes(rows.reshape(kvh, hd)[kv_heads], d).reshape(-1))
                            if with_bias and side == "k":
                                lane = np.zeros((len(kv_heads), d))
                                lane[:, hd] = brow[j] / scale
                                x = fz.add(AddC, v, [x], node.name,
                                           const=fz.store(fz.out.consts, "c", lane.reshape(-1)))
                                fz.out.lengths[x] = lane.size
                            kvs.append(x)
                    y = fz.add(AttentionRows, v, [y, *kvs], node.name, layer=layer, q_heads=len(heads),
                               kv_heads=len(kv_heads), head_dim=d, length=attend, scale=scale,
                               first=c0 if len(keys) else total, attend=c0 + KEYS_PER_OP >= len(keys))
                    fz.out.lengths[y] = len(heads) * d
                widest = max(widest, (len(kv_heads), d))
                at = _lanes(layout["y"](bi, i).reshape(qh, hd)[heads], d).reshape(-1)
                place = np.zeros((fz.ix.numel(v), len(heads) * d))
                place[at[at >= 0], np.flatnonzero(at >= 0)] = 1.0
                out = place_add(fz, v, node, out, place, y)
    if out is None:
        fz.fail(v, "masks every key of every query row: its output is a constant")
    fz.out.kv[layer] = {"kv_heads": widest[0], "head_dim": widest[1], "present": []}
    return out


#: A key whose bias is this far below its row's largest is masked (exp(-80) < 2**-115: below float32's precision).
MASKED = 80.0


def _groups(bias):
    """(query heads, keys attended, bias per key) of one query row, [heads, keys] bias: all heads at once when
    they attend the same keys with the same bias, else one head at a time. A row that attends no key is left out
    (its output is zero, as ONNX's fully masked row)."""
    keep = np.isfinite(bias)
    # softmax is shift-invariant per row: bias relative to the row's largest, and a key far below it (a "masked"
    # float such as -3.4e38) weighs exp(-MASKED) or less: left out, so no huge lane ruins a block's exponent
    top = np.max(np.where(keep, bias, -np.inf), axis=1, keepdims=True)
    bias = np.where(keep, bias - np.where(np.isfinite(top), top, 0.0), -np.inf)
    keep &= bias > -MASKED
    kept = np.where(keep, bias, 0.0)
    if (keep == keep[0]).all() and (kept == kept[0]).all():
        keys = np.flatnonzero(keep[0])
        return [(list(range(len(bias))), keys, bias[0])] if keys.size else []
    out = []
    for h in range(len(bias)):
        keys = np.flatnonzero(keep[h])
        if keys.size:
            out.append(([h], keys, bias[h]))
    return out


def _lanes(rows, d):
    """[heads, hd] element indices padded with zero lanes (-1) to [heads, d]."""
    return np.pad(rows, ((0, 0), (0, d - rows.shape[1])), constant_values=-1)


def _past_rows(fz, pk, hd):
    """(batch, position) -> the flat indices of each KV head's past key (or value) row, [B, kvh, P, d] layout."""
    t = np.arange(fz.ix.numel(pk)).reshape(fz.ix.shape(pk))
    t = np.pad(t, ((0, 0), (0, 0), (0, 0), (0, hd - t.shape[3])), constant_values=-1)
    return lambda bi, j: t[bi, :, j, :].reshape(-1)


def _present(fz, v, node, new, past, n_past, kvh):
    """present_key/present_value: the past KV then the new keys (or values), [B, kvh, P + S, d], by 0/1 GEMVs."""
    shape = fz.ix.shape(v)
    out = np.arange(int(np.prod(shape))).reshape(shape)
    ns = fz.ix.shape(new)
    src = np.arange(int(np.prod(ns))).reshape(ns)
    if len(ns) == 3:
        src = src.reshape(ns[0], ns[1], kvh, -1).transpose(0, 2, 1, 3)
    parts = []
    if past:
        m = np.zeros((out.size, fz.ix.numel(past)))
        m[out[:, :, :n_past].reshape(-1), np.arange(fz.ix.numel(past))] = 1.0
        parts.append((m, fz.vector(past)))
    m = np.zeros((out.size, src.size))
    m[out[:, :, n_past:].reshape(-1), src.reshape(-1)] = 1.0
    parts.append((m, fz.vector(new)))
    return assemble(fz, v, node, parts)


def _layout(fz, v, node, q, k, val):
    """Dimensions and the flat indices of each (batch, row)'s heads x head_dim elements in Q, K, V and Y."""
    qs, ks, vs, ys = (fz.ix.shape(x) for x in (q, k, val, v))
    if len(qs) == 4:
        b, qh, sq, d = qs
        _, kvh, skv, dk = ks
        dv = vs[3]
    elif len(qs) == 3:
        qh, kvh = node.attrs.get("q_num_heads", 0), node.attrs.get("kv_num_heads", 0)
        if not qh or not kvh:
            fz.fail(v, "is 3-D without q_num_heads/kv_num_heads")
        b, sq, d = qs[0], qs[1], qs[2] // qh
        skv, dk, dv = ks[1], ks[2] // kvh, vs[2] // kvh
    else:
        fz.fail(v, f"has queries of rank {len(qs)}")
    if dk != d:
        fz.fail(v, f"has head sizes {d} for queries and {dk} for keys")
    if qh % kvh:
        fz.fail(v, f"has {qh} query heads, not a multiple of {kvh} KV heads")
    # ATTN has one head_dim: the narrower of q/k and v is padded with zeros (zero q.k terms, zero output lanes)
    hd = max(d, dv)
    idx = {name: np.arange(int(np.prod(s))).reshape(s) for name, s in (("q", qs), ("k", ks), ("v", vs), ("y", ys))}

    def rows(name, heads):
        t = idx[name]
        if t.ndim == 3:
            t = t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(0, 2, 1, 3)  # [B, heads, S, D]
        t = np.pad(t, ((0, 0), (0, 0), (0, 0), (0, hd - t.shape[3])), constant_values=-1)
        return lambda bi, s: t[bi, :, s, :].reshape(-1)

    return {"dims": (b, qh, kvh, sq, skv, hd), "head_sizes": (d, dv), "q": rows("q", qh), "k": rows("k", kvh),
            "v": rows("v", kvh), "y": rows("y", qh)}


def _scale(node, layout) -> float:
    scale = node.attrs.get("scale")
    return 1.0 / math.sqrt(layout["head_sizes"][0]) if scale is None else float(scale)
