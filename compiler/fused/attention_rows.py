"""``attn_rows``: ONNX ``Attention`` without past KV (Q, K, V are tensors of a small graph), on the KV buffer.

Each batch gets a KV-buffer layer of its own: its keys and values are written position by position
(``KVAPPEND``, one per KV row) and each query row is one ``ATTN`` over a prefix of that layer. The rows are
cut out of Q/K/V and the outputs put back in the output's layout by 0/1 GEMVs (``affine.select``/``assemble``).
What each query row attends is *measured*: the node is evaluated on random inputs and every query row must
equal softmax attention over a prefix ``[0, L)`` of the keys (no mask, ``is_causal``, or a constant mask
that hides a suffix); anything else is refused with the reason.
"""

from __future__ import annotations

import math

import numpy as np

from ..codegen import REG_POSITION, scale_imm
from ..overlay_graph import VOp
from .affine import place_add, select
from .attention import gqa

__all__ = ["AttentionRows", "attention_rows"]


class AttentionRows(VOp):
    """One query row of one batch: ins are the row's queries, then the batch's keys and values per position
    (k_0, v_0, k_1, v_1, ...). The batch's first row (``append``) writes them to its layer."""

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
        K = np.stack([k.reshape(kvh, d) for k in ins[1::2]], 1)[:, :n]
        V = np.stack([v.reshape(kvh, d) for v in ins[2::2]], 1)[:, :n]
        return gqa(ins[0].reshape(qh, d) * a["scale"], K, V)

    def emit(self, cg, src):
        a = self.attrs
        if a["append"]:
            for j in range(len(src) // 2):
                k, v = src[1 + 2 * j], src[2 + 2 * j]
                cg.instr("KVAPPEND", k=k[0], k_e=k[1], v=v[0], v_e=v[1], kv_base=cg.kv_bases[a["layer"]], heads=a["kv_heads"],
                         head_dim=a["head_dim"], pos_reg=REG_POSITION, pos_imm=j)
        n = a["q_heads"] * a["head_dim"]
        q = cg.scratch(f"qscaled:{self.out}", n)
        imm_m, imm_e = scale_imm(a["scale"], cg.who)
        cg.instr("VSCALE", a=src[0][0], a_e=src[0][1], dst=q[0], dst_e=q[1], len=n, imm_m=imm_m, imm_e=imm_e)
        dst = cg.vector(self.out)
        cg.instr("ATTN", q=q[0], q_e=q[1], dst=dst[0], dst_e=dst[1], kv_base=cg.kv_bases[a["layer"]], q_heads=a["q_heads"],
                 kv_heads=a["kv_heads"], head_dim=a["head_dim"], len_reg=REG_POSITION, len_imm=a["length"],
                 stats=cg.stats_addr)


def attention_rows(fz, v, node):
    """The fusion rule: ONNX Attention whose past_key/past_value are absent (see the module docstring)."""
    if node is None or node.op != "Attention":
        return None
    ins = list(node.inputs) + [""] * (6 - len(node.inputs))
    q, k, val, mask, pk, pv = ins[:6]
    if pk or pv:
        return None
    if v != node.outputs[0] or any(o for o in node.outputs[1:]):
        fz.fail(v, "has outputs other than Y (present KV or qk_matmul_output): the overlay's ATTN keeps the "
                   "scores and the cache on chip")
    window = [node.attrs.get(a, -1) for a in ("left_window_size", "right_window_size")]
    if any(w is not None and w >= 0 for w in window):
        fz.fail(v, f"uses a sliding window (left/right {window[0]}/{window[1]}): ATTN attends a prefix [0, len) "
                   "of the KV buffer, never a window that hides its start")
    if node.attrs.get("softcap", 0.0):
        fz.fail(v, "uses softcap: the overlay's ATTN has no tanh cap on the scores")
    if mask and not fz.ix.is_const(mask):
        fz.fail(v, "has an attention mask that is a runtime input: ATTN attends a prefix [0, len) of the KV "
                   "buffer whose length is fixed in the instruction")
    layout = _layout(fz, v, node, q, k, val)
    b, qh, kvh, sq, skv, d = layout["dims"]
    if fz.out.kv:
        used = max(fz.out.kv) + 1
    else:
        used = 0
    lengths = _prefix_lengths(fz, v, node, q, k, val, layout)
    scale = _scale(node, layout)
    qv, kv_, vv = fz.vector(q), fz.vector(k), fz.vector(val)
    out = None
    for bi in range(b):
        layer = used + bi
        fz.out.kv[layer] = {"kv_heads": kvh, "head_dim": d, "present": []}
        kvs = []
        for j in range(skv):
            kvs += [select(fz, v, node, kv_, layout["k"](bi, j)), select(fz, v, node, vv, layout["v"](bi, j))]
        for i in range(sq):
            qi = select(fz, v, node, qv, layout["q"](bi, i))
            y = fz.add(AttentionRows, v, [qi, *kvs], node.name, layer=layer, q_heads=qh, kv_heads=kvh, head_dim=d,
                       length=int(lengths[bi][i]), scale=scale, append=i == 0)
            fz.out.lengths[y] = qh * d
            place = np.zeros((fz.ix.numel(v), qh * d))
            at = layout["y"](bi, i)
            place[at[at >= 0], np.flatnonzero(at >= 0)] = 1.0
            out = place_add(fz, v, node, out, place, y)
    return out


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


def _prefix_lengths(fz, v, node, q, k, val, layout):
    """[batch][query row] -> L: the row attends keys [0, L). Measured on random inputs against each L."""
    b, qh, kvh, sq, skv, d = layout["dims"]
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal(fz.ix.shape(x)).astype(np.float32) for x in (q, k, val)}
    got = np.asarray(fz.ix.evaluate(v, feeds), np.float64).reshape(-1)
    scale = _scale(node, layout)
    flat = {x: np.append(feeds[x].reshape(-1).astype(np.float64), 0.0) for x in feeds}  # index -1: padding
    out = []
    for bi in range(b):
        K = np.stack([flat[k][layout["k"](bi, j)].reshape(kvh, d) for j in range(skv)], 1)
        V = np.stack([flat[val][layout["v"](bi, j)].reshape(kvh, d) for j in range(skv)], 1)
        row = []
        for i in range(sq):
            qi = flat[q][layout["q"](bi, i)].reshape(qh, d) * scale
            at = layout["y"](bi, i)
            want = np.where(at >= 0, got[at], 0.0)
            for n in range(skv, 0, -1):
                if np.allclose(gqa(qi, K[:, :n], V[:, :n]), want, rtol=1e-3, atol=1e-4):
                    row.append(n)
                    break
            else:
                fz.fail(v, f"has a query row (batch {bi}, row {i}) that attends something other than a prefix of "
                           "the keys with softmax(scale * q.K^T): ATTN attends a prefix [0, len)")
        out.append(row)
    return out
