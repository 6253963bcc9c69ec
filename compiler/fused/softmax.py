"""``softmax``: ONNX ``Softmax`` (and Sigmoid, Tanh) of a small tensor, on the attention unit (the only place the
overlay has an exp).

For each group of N elements the softmax runs over, the keys are ``k_j = [x_j, 0, ..., 0]`` (a 0/1 GEMV cuts them
out of x), the values the one-hot ``e_j`` and the query ``e_0``, all of head_dim N: then ``q.k_j = x_j`` and ATTN's
normalized ``sum_j softmax(x)_j e_j`` is the group's softmax. The groups reuse one KV-buffer layer in turn (KVAPPEND
and ATTN share the compute queue, so a group's ATTN is done before the next group's keys overwrite it); the group
outputs are put back in place by 0/1 GEMVs. The groups are derived from the opset's axis rule and the node is then
evaluated to confirm them.
"""

from __future__ import annotations

import numpy as np

from ..codegen import REG_POSITION
from ..overlay_graph import VOp
from .affine import place_add, select

__all__ = ["Softmax"]


class Softmax(VOp):
    """One group: ins are its keys k_j; attrs the layer, the one-hot constants and N."""

    kind = "softmax"
    stats_words = 2  # ATTN's max and sum of its one head

    @staticmethod
    def match(fz, v, node):
        if node is None or node.op not in ("Softmax", "Sigmoid", "Tanh"):
            return None
        return _softmax(fz, v, node) if node.op == "Softmax" else _gate(fz, v, node)

    def reference(self, ins, step):
        x = np.array([k[0] for k in ins])
        p = np.exp(x - x.max())
        return p / p.sum()

    def emit(self, cg, src):
        a = self.attrs
        n = a["n"]
        for j, k in enumerate(src):
            e = cg.load_const(a["onehot"][j], n)
            cg.instr("KVAPPEND", k=k[0], k_e=k[1], v=e[0], v_e=e[1], kv_base=cg.kv_bases[a["layer"]], heads=1, head_dim=n,
                     pos_reg=REG_POSITION, pos_imm=j)
        q = cg.load_const(a["onehot"][0], n)
        dst = cg.vector(self.out)
        cg.instr("ATTN", q=q[0], q_e=q[1], dst=dst[0], dst_e=dst[1], kv_base=cg.kv_bases[a["layer"]], q_heads=1, kv_heads=1,
                 head_dim=n, len_reg=REG_POSITION, len_imm=n, stats=cg.stats_addr)


def _groups(fz, node, shape):
    """Index arrays of the groups the softmax normalizes over (opset 13+: one axis; before: the flattened tail)."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    if fz.g.opset >= 13:
        axis = node.attrs.get("axis", -1) % len(shape)
        return np.moveaxis(idx, axis, -1).reshape(-1, shape[axis])
    axis = node.attrs.get("axis", 1) % len(shape)
    return idx.reshape(int(np.prod(shape[:axis])), -1)


def _gate(fz, v, node):
    """Sigmoid and Tanh as two-element softmaxes: softmax([a x, 0]) = [sigmoid(a x), 1 - sigmoid(a x)], so
    sigmoid(x) is its first element (a = 1) and tanh(x) = sigmoid(2x) - sigmoid(-2x) the difference (a = 2)."""
    x = node.inputs[0]
    a, signs = (1.0, (1.0, 0.0)) if node.op == "Sigmoid" else (2.0, (1.0, -1.0))
    layer, onehot = _layer(fz, 2)
    xv = fz.vector(x)
    zero = select(fz, v, node, xv, [-1, -1])
    y = None
    for i in range(fz.ix.numel(x)):
        key = select(fz, v, node, xv, [i, -1], weight=a)
        p = fz.add(Softmax, v, [key, zero], node.name, layer=layer, n=2, onehot=onehot)
        fz.out.lengths[p] = 2
        place = np.zeros((fz.ix.numel(v), 2))
        place[i] = signs
        y = place_add(fz, v, node, y, place, p)
    return y


def _layer(fz, n):
    """A KV-buffer layer of one head of *n* for the groups to take turns on, and the one-hot constants e_j."""
    layer = max(fz.out.kv) + 1 if fz.out.kv else 0
    fz.out.kv[layer] = {"kv_heads": 1, "head_dim": n, "present": []}
    return layer, [fz.store(fz.out.consts, "c", np.eye(1, n, j).reshape(-1)) for j in range(n)]


def _softmax(fz, v, node):
    x = node.inputs[0]
    shape = fz.ix.shape(x)
    groups = _groups(fz, node, shape)
    n = groups.shape[1]
    feed = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = np.asarray(fz.ix.evaluate(v, {x: feed}), np.float64).reshape(-1)
    flat = feed.reshape(-1).astype(np.float64)
    for g in groups:
        p = np.exp(flat[g] - flat[g].max())
        if not np.allclose(got[g], p / p.sum(), rtol=1e-4, atol=1e-6):
            fz.fail(v, "does not normalize over the groups its axis gives")
    layer, onehot = _layer(fz, n)
    xv = fz.vector(x)
    y = None
    for g in groups:
        keys = [select(fz, v, node, xv, [i] + [-1] * (n - 1)) for i in g]
        p = fz.add(Softmax, v, keys, node.name, layer=layer, n=n, onehot=onehot)
        fz.out.lengths[p] = n
        place = np.zeros((fz.ix.numel(v), n))
        place[g, np.arange(n)] = 1.0
        y = place_add(fz, v, node, y, place, p)
    return y
