"""``attn``: the past/present KV concat, scores, softmax and P.V of a layer (or ONNX ``Attention``),
checked by evaluating the matched region against a reference grouped-query attention; it becomes
VSCALE (q by the softmax scale) + KVAPPEND + ATTN."""

from __future__ import annotations

import math

import numpy as np

from kvoverlay import isa

from ..codegen import scale_imm
from ..graph_tools import PAST_KV
from ..overlay_graph import VOp

__all__ = ["Attention", "gqa"]


class Attention(VOp):
    kind = "attn"

    @property
    def stats_words(self) -> int:
        return 2 * self.attrs["q_heads"]  # a running max and sum per query head

    @staticmethod
    def match(fz, v, node):
        if node.op == "Attention":
            return _attention_op(fz, v, node)
        if node.op != "MatMul":
            return None
        p, vside = node.inputs
        soft = fz.ix.node_of(p)
        if soft is None or soft.op != "Softmax":
            return None
        vcat = _find_concat(fz, vside)
        if vcat is None or vcat[1] != "value":
            return None
        scores, mask = _split_mask(fz, soft.inputs[0])
        sc, _ = fz.ix.strip_scalar_muls(scores)
        mm = fz.ix.producer.get(sc)
        if mm is None or mm.op != "MatMul":
            return None
        q, _ = fz.ix.strip_scalar_muls(mm.inputs[0])
        kcat = _find_concat(fz, mm.inputs[1])
        if kcat is None or kcat[1] != "key" or kcat[0] != vcat[0]:
            return None
        layer = kcat[0]
        past_shape = fz.g.values[kcat[2]].shape  # [1, kv_heads, past, head_dim]
        kvh, hd = past_shape[1], past_shape[3]
        nq = fz.ix.numel(q)
        if nq % hd or (nq // hd) % kvh:
            fz.fail(v, f"has {nq} query elements, not a multiple of {kvh} KV heads of {hd}")
        qh = nq // hd
        if mask is not None:
            _check_mask(fz, v, mask)
        scale = _attention_scale(fz, v, q, kcat, vcat, qh, kvh, hd, mask)
        return _add_attention(fz, v, node.name, q, kcat, vcat, layer, qh, kvh, hd, scale)

    def reference(self, ins, step):
        a = self.attrs
        qh, kvh, d = a["q_heads"], a["kv_heads"], a["head_dim"]
        # a part of a layer's attention (compiler.split_attention: its KV heads from kv_group on) keeps its own
        ks, vs = step.kv[a["layer"]] if "kv_group" not in a else step.kv.setdefault((a["layer"], a["kv_group"]), ([], []))
        ks.append(ins[1].reshape(kvh, d))
        vs.append(ins[2].reshape(kvh, d))
        return gqa(ins[0].reshape(qh, d) * a["scale"], np.stack(ks, 1), np.stack(vs, 1))

    def emit(self, cg, src):
        a = self.attrs
        n = a["q_heads"] * a["head_dim"]
        q = cg.scratch(f"qscaled:{self.out}", n)
        imm_m, imm_e = scale_imm(a["scale"], cg.who)
        cg.instr("VSCALE", a=src[0][0], a_e=src[0][1], dst=q[0], dst_e=q[1], len=n, imm_m=imm_m, imm_e=imm_e)
        kv_base = cg.kv_bases[a["layer"]] + a.get("kv_group", 0) * cg.cfg.kv_head_columns(a["head_dim"])
        cg.instr("KVAPPEND", k=src[1][0], k_e=src[1][1], v=src[2][0], v_e=src[2][1], kv_base=kv_base,
                 heads=a["kv_heads"], head_dim=a["head_dim"], pos_reg=cg.kv_slot_reg, pos_imm=0)
        dst = cg.vector(self.out)
        cg.instr("ATTN", q=q[0], q_e=q[1], dst=dst[0], dst_e=dst[1], kv_base=kv_base, q_heads=a["q_heads"],
                 kv_heads=a["kv_heads"], head_dim=a["head_dim"], len_reg=cg.kv_len_reg, len_imm=cg.kv_len_imm,
                 stats=cg.stats_addr if cg.attn_stats else isa.ATTN_NO_STATS)


def gqa(q, K, V) -> np.ndarray:
    """Softmax attention of pre-scaled queries [q_heads, d] over K, V [kv_heads, positions, d], heads grouped."""
    group = q.shape[0] // K.shape[0]
    heads = []
    for h in range(q.shape[0]):
        s = K[h // group] @ q[h]
        p = np.exp(s - s.max())
        heads.append(p @ V[h // group] / p.sum())
    return np.concatenate(heads)


def _kv_concat(fz, value):
    """(layer, kind, past input, new value, present output) if *value* is Concat(past_key_values.N.*, new)."""
    node = fz.ix.producer.get(value)
    if node is None or node.op != "Concat" or len(node.inputs) != 2:
        return None
    m = PAST_KV.match(node.inputs[0])
    if not m:
        return None
    return int(m.group(1)), m.group(2), node.inputs[0], node.inputs[1], node.outputs[0]


def _find_concat(fz, value, budget=12):
    """Walk back from *value* through single-input layout ops (repeat_kv, transposes, scalar scales) to a KV concat."""
    seen = 0
    while seen < budget:
        seen += 1
        got = _kv_concat(fz, value)
        if got is not None:
            return got
        node = fz.ix.producer.get(value)
        if node is None:
            return None
        data = [i for i in node.inputs if i and not fz.ix.is_const(i)]
        if len(data) != 1:
            return None
        value = data[0]
    return None


def _split_mask(fz, scores):
    """(scores, additive mask or None): the mask is the Add operand that does not reach a score MatMul."""
    snode = fz.ix.node_of(scores)
    if snode is None or snode.op != "Add":
        return scores, None
    for i, j in ((0, 1), (1, 0)):
        s = fz.ix.producer.get(fz.ix.strip_scalar_muls(snode.inputs[i])[0])
        if s is not None and s.op == "MatMul" and not fz.ix.is_const(s.inputs[1]):
            return snode.inputs[i], snode.inputs[j]
    return scores, None


def _check_mask(fz, v, mask):
    c = fz.ix.const(mask)
    if c is None:
        deps = fz.ix.deps.get(mask, frozenset())
        if deps - {"position_ids"}:
            fz.fail(v, f"adds a computed attention mask that depends on {sorted(deps)}")
        return
    if not np.all(c == c.reshape(-1)[0]):
        fz.fail(v, "adds an attention mask that hides some positions of the cache (only full causal "
                     "attention over the cache is supported)")


def _attention_scale(fz, v, q, kcat, vcat, qh, kvh, hd, mask):
    """Numerically identify the matched region as softmax(scale * q.K^T) V; return scale."""
    rng = np.random.default_rng(0)
    past = fz.g.values[kcat[2]].shape[2]
    feeds = {}
    for name in (q, kcat[3], vcat[3], kcat[2], vcat[2]):
        shp = fz.ix.shape(name)
        feeds[name] = rng.standard_normal(shp).astype(np.float32)
    if mask is not None and not fz.ix.is_const(mask):
        shape = fz.g.values["position_ids"].shape
        feeds["position_ids"] = np.full(shape, past, np.dtype(fz.g.values["position_ids"].dtype))
    got = np.asarray(fz.ix.evaluate(v, feeds), np.float64).reshape(-1)
    K = np.concatenate([feeds[kcat[2]].reshape(kvh, past, hd),
                        feeds[kcat[3]].reshape(kvh, 1, hd)], axis=1).astype(np.float64)
    V = np.concatenate([feeds[vcat[2]].reshape(kvh, past, hd),
                        feeds[vcat[3]].reshape(kvh, 1, hd)], axis=1).astype(np.float64)
    Q = feeds[q].reshape(qh, hd).astype(np.float64)
    raw = np.stack([K[h // (qh // kvh)] @ Q[h] for h in range(qh)])

    def ref(s):
        z = raw * s
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return np.stack([p[h] @ V[h // (qh // kvh)] for h in range(qh)]).reshape(-1)

    # the scale that reproduces the region's softmax: solve on the first head's probabilities
    for s in _scale_candidates(fz, v, hd):
        if np.allclose(got, ref(s), rtol=1e-3, atol=1e-4):
            return s
    fz.fail(v, "looks like attention over the KV cache, but evaluating it does not match "
                 "softmax(scale * q.K^T) V with grouped-query heads")


def _scale_candidates(fz, v, hd):
    out = [1.0 / math.sqrt(hd), 1.0]
    node = fz.ix.producer.get(v)
    soft = fz.ix.node_of(node.inputs[0])
    scores, _ = _split_mask(fz, soft.inputs[0])
    sc, post = fz.ix.strip_scalar_muls(scores)
    mm = fz.ix.producer[sc]
    _, qf = fz.ix.strip_scalar_muls(mm.inputs[0])
    kf = 1.0
    value = mm.inputs[1]
    for _ in range(12):
        value, f = fz.ix.strip_scalar_muls(value)
        kf *= f
        n = fz.ix.producer.get(value)
        if n is None or _kv_concat(fz, value) is not None:
            break
        data = [i for i in n.inputs if i and not fz.ix.is_const(i)]
        if len(data) != 1:
            break
        value = data[0]
    return [post * qf * kf, *out]


def _add_attention(fz, v, source, q, kcat, vcat, layer, qh, kvh, hd, scale):
    if layer in fz.out.kv:
        fz.fail(v, f"is a second attention over the KV cache of layer {layer}")
    qv = fz.vector(q)
    kv_, vv = fz.vector(kcat[3]), fz.vector(vcat[3])
    if fz.out.lengths[kv_] != kvh * hd or fz.out.lengths[vv] != kvh * hd:
        fz.fail(v, f"appends keys/values of {fz.out.lengths[kv_]}/{fz.out.lengths[vv]} elements; "
                     f"the cache holds {kvh} heads of {hd}")
    fz.out.kv[layer] = {"kv_heads": kvh, "head_dim": hd, "present": [kcat[4], vcat[4]]}
    fz.present_done.update(kcat[4:5] + vcat[4:5])
    out = fz.add(Attention, v, [qv, kv_, vv], source, layer=layer, q_heads=qh, kv_heads=kvh, head_dim=hd,
                    scale=float(scale))
    fz.out.lengths[out] = qh * hd
    return out


def _attention_op(fz, v, node):
    """ONNX Attention (opset 23+) with past_key/past_value inputs."""
    if v != node.outputs[0]:
        fz.fail(v, "uses an Attention output other than Y")
    ins = list(node.inputs) + [""] * (6 - len(node.inputs))
    q, k, val, mask, pk, pv = ins[:6]
    if not pk or not pv:
        fz.fail(v, "has no past_key/past_value: the overlay keeps the KV cache on chip")
    mk, mv = PAST_KV.match(pk), PAST_KV.match(pv)
    if not mk or not mv or mk.group(1) != mv.group(1):
        fz.fail(v, "takes its past KV from somewhere other than the past_key_values.N inputs")
    if node.attrs.get("softcap", 0.0) or node.attrs.get("qk_matmul_output_mode", 0):
        fz.fail(v, "uses softcap or qk_matmul_output_mode, which the overlay does not support")
    if mask:
        _check_mask(fz, v, mask)
    layer = int(mk.group(1))
    past_shape = fz.g.values[pk].shape
    kvh, hd = past_shape[1], past_shape[3]
    qh = fz.ix.numel(q) // hd
    scale = node.attrs.get("scale")
    scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    outs = list(node.outputs) + ["", ""]
    kcat = (layer, "key", pk, k, outs[1])
    vcat = (layer, "value", pv, val, outs[2])
    return _add_attention(fz, v, node.name, q, kcat, vcat, layer, qh, kvh, hd, scale)
