"""A tiny Llama-style decoder as ONNX, built with ``onnx.helper`` only (no torch).

The graph follows the I/O convention of optimum's ``text-generation-with-past``
exports: inputs ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.N.key/value``; outputs ``logits`` and ``present.N.key/value``.
Its op patterns are the ones exporters emit (RMSNorm spelled out as
Pow/ReduceMean/Add/Sqrt/Div/Mul, rotary embedding from Gather-ed cos/sin tables
with a Slice/Neg/Concat half rotation, GQA by Expand/Reshape of the KV heads,
additive causal mask, SwiGLU MLP), so the compiler's importer can be tested
without downloading a model. Weights are deterministic for a given seed.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_llama_onnx", "greedy_decode_ort"]

OPSET = 18
_B, _S, _P = "batch_size", "sequence_length", "past_sequence_length"
_T = "past_sequence_length + sequence_length"


class _Graph:
    """Node/initializer accumulator with unique names."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, name, value, dtype=np.float32):
        arr = np.asarray(value, dtype=dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type, inputs, name, n_out=1, **attrs):
        self._n += 1
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self._n}_{name}", **attrs))
        return outs[0] if n_out == 1 else outs


def build_llama_onnx(path: str | os.PathLike | None = None, *, vocab: int = 64, hidden: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, head_dim: int = 16, ffn: int = 128, seed: int = 0,
                     weight_scale: float = 2.0, max_positions: int = 256, rope_theta: float = 10000.0,
                     eps: float = 1e-5) -> onnx.ModelProto:
    """Build (and optionally save to *path*) a small Llama-style decoder with KV-cache I/O.

    Projection weights are ``[in, out]`` initializers drawn from a normal
    distribution scaled by ``weight_scale / sqrt(in)``; norm weights are near 1.
    """
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even")
    rng = np.random.default_rng(seed)
    g = _Graph()

    def weight(name, n_in, n_out):
        return g.const(name, rng.standard_normal((n_in, n_out)) * (weight_scale / np.sqrt(n_in)))

    def norm_weight(name):
        return g.const(name, 1.0 + 0.1 * rng.standard_normal(hidden))

    # shared constants
    two = g.const("const_two", 2.0)
    one = g.const("const_one", 1.0)
    eps_c = g.const("const_eps", eps)
    ax_last = g.const("axes_last", [-1], np.int64)
    ax1 = g.const("axes_1", [1], np.int64)
    ax2 = g.const("axes_2", [2], np.int64)
    zero_f = g.const("const_zero_f", 0.0)
    neg_big = g.const("const_mask_min", np.finfo(np.float32).min)
    half = head_dim // 2
    sl_lo = (g.const("slice_lo_start", [0], np.int64), g.const("slice_lo_end", [half], np.int64))
    sl_hi = (g.const("slice_hi_start", [half], np.int64), g.const("slice_hi_end", [head_dim], np.int64))
    q_shape = g.const("shape_q", [0, 0, heads, head_dim], np.int64)
    kv_shape = g.const("shape_kv", [0, 0, kv_heads, head_dim], np.int64)
    rep = heads // kv_heads
    rep_shape = g.const("shape_repeat_kv", [1, 1, rep, 1, 1], np.int64)
    merge_heads = g.const("shape_merge_heads", [0, heads, -1, head_dim], np.int64)
    attn_out_shape = g.const("shape_attn_out", [0, 0, heads * head_dim], np.int64)
    scale = g.const("attn_scale", 1.0 / np.sqrt(head_dim))

    # rotary tables (HF layout: cat(freqs, freqs))
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos_t = g.const("rotary_cos_cached", np.cos(emb))
    sin_t = g.const("rotary_sin_cached", np.sin(emb))

    embed = g.const("model.embed_tokens.weight", rng.standard_normal((vocab, hidden)))

    def rmsnorm(x, w, name):
        p = g.op("Pow", [x, two], f"{name}/pow")
        m = g.op("ReduceMean", [p, ax_last], f"{name}/mean", keepdims=1)
        a = g.op("Add", [m, eps_c], f"{name}/add_eps")
        s = g.op("Sqrt", [a], f"{name}/sqrt")
        r = g.op("Div", [one, s], f"{name}/rsqrt")
        y = g.op("Mul", [x, r], f"{name}/scaled")
        return g.op("Mul", [w, y], f"{name}/out")

    def rotate(x, cos, sin, name):
        x1 = g.op("Slice", [x, *sl_lo, ax_last], f"{name}/x1")
        x2 = g.op("Slice", [x, *sl_hi, ax_last], f"{name}/x2")
        nx2 = g.op("Neg", [x2], f"{name}/neg_x2")
        rot = g.op("Concat", [nx2, x1], f"{name}/rotate_half", axis=-1)
        a = g.op("Mul", [x, cos], f"{name}/x_cos")
        b = g.op("Mul", [rot, sin], f"{name}/rot_sin")
        return g.op("Add", [a, b], f"{name}/out")

    # ---- graph inputs-derived tensors
    h = g.op("Gather", [embed, "input_ids"], "model/embed_tokens", axis=0)
    cos = g.op("Unsqueeze", [g.op("Gather", [cos_t, "position_ids"], "rotary/cos_gather", axis=0), ax1], "rotary/cos")
    sin = g.op("Unsqueeze", [g.op("Gather", [sin_t, "position_ids"], "rotary/sin_gather", axis=0), ax1], "rotary/sin")

    # additive causal mask [B, 1, S, T]: key j visible to query i iff j <= past + i and attention_mask[b, j]
    ids_shape = g.op("Shape", ["input_ids"], "mask/ids_shape")
    seq = g.op("Gather", [ids_shape, g.const("idx_1", 1, np.int64)], "mask/seq_len", axis=0)
    mask_shape = g.op("Shape", ["attention_mask"], "mask/mask_shape")
    total = g.op("Gather", [mask_shape, g.const("idx_1b", 1, np.int64)], "mask/total_len", axis=0)
    past = g.op("Sub", [total, seq], "mask/past_len")
    zero_i = g.const("const_zero_i", 0, np.int64)
    one_i = g.const("const_one_i", 1, np.int64)
    kpos = g.op("Range", [zero_i, total, one_i], "mask/key_pos")
    qpos = g.op("Range", [past, total, one_i], "mask/query_pos")
    qpos_col = g.op("Unsqueeze", [qpos, ax1], "mask/query_pos_col")
    causal = g.op("LessOrEqual", [kpos, qpos_col], "mask/causal")  # [S, T]
    am = g.op("Cast", ["attention_mask"], "mask/attn_bool", to=TensorProto.BOOL)
    am4 = g.op("Unsqueeze", [am, g.const("axes_1_2", [1, 2], np.int64)], "mask/attn_b11t")
    allowed = g.op("And", [causal, am4], "mask/allowed")  # [B, 1, S, T]
    add_mask = g.op("Where", [allowed, zero_f, neg_big], "mask/additive")

    outputs_present = []
    for i in range(layers):
        pre = f"model/layers.{i}"
        wpre = f"model.layers.{i}"
        x = rmsnorm(h, norm_weight(f"{wpre}.input_layernorm.weight"), f"{pre}/input_layernorm")
        wq = weight(f"{wpre}.self_attn.q_proj.weight", hidden, heads * head_dim)
        wk = weight(f"{wpre}.self_attn.k_proj.weight", hidden, kv_heads * head_dim)
        wv = weight(f"{wpre}.self_attn.v_proj.weight", hidden, kv_heads * head_dim)
        wo = weight(f"{wpre}.self_attn.o_proj.weight", heads * head_dim, hidden)
        q = g.op("MatMul", [x, wq], f"{pre}/self_attn/q_proj")
        k = g.op("MatMul", [x, wk], f"{pre}/self_attn/k_proj")
        v = g.op("MatMul", [x, wv], f"{pre}/self_attn/v_proj")
        q = g.op("Transpose", [g.op("Reshape", [q, q_shape], f"{pre}/self_attn/q_reshape")], f"{pre}/self_attn/q_t",
                 perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, kv_shape], f"{pre}/self_attn/k_reshape")], f"{pre}/self_attn/k_t",
                 perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [v, kv_shape], f"{pre}/self_attn/v_reshape")], f"{pre}/self_attn/v_t",
                 perm=[0, 2, 1, 3])
        q = rotate(q, cos, sin, f"{pre}/self_attn/rope_q")
        k = rotate(k, cos, sin, f"{pre}/self_attn/rope_k")
        pk = g.op("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        pv = g.op("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        outputs_present += [pk, pv]

        def repeat_kv(t, name):
            u = g.op("Unsqueeze", [t, ax2], f"{name}/unsqueeze")
            e = g.op("Expand", [u, rep_shape], f"{name}/expand")
            return g.op("Reshape", [e, merge_heads], f"{name}/reshape")

        kr = repeat_kv(pk, f"{pre}/self_attn/repeat_k")
        vr = repeat_kv(pv, f"{pre}/self_attn/repeat_v")
        kt = g.op("Transpose", [kr], f"{pre}/self_attn/k_transpose", perm=[0, 1, 3, 2])
        sc = g.op("MatMul", [q, kt], f"{pre}/self_attn/qk")
        sc = g.op("Mul", [sc, scale], f"{pre}/self_attn/scaled")
        sc = g.op("Add", [sc, add_mask], f"{pre}/self_attn/masked")
        pr = g.op("Softmax", [sc], f"{pre}/self_attn/softmax", axis=-1)
        ao = g.op("MatMul", [pr, vr], f"{pre}/self_attn/pv")
        ao = g.op("Transpose", [ao], f"{pre}/self_attn/out_t", perm=[0, 2, 1, 3])
        ao = g.op("Reshape", [ao, attn_out_shape], f"{pre}/self_attn/out_reshape")
        ao = g.op("MatMul", [ao, wo], f"{pre}/self_attn/o_proj")
        h = g.op("Add", [h, ao], f"{pre}/attn_residual")

        x = rmsnorm(h, norm_weight(f"{wpre}.post_attention_layernorm.weight"), f"{pre}/post_attention_layernorm")
        wg = weight(f"{wpre}.mlp.gate_proj.weight", hidden, ffn)
        wu = weight(f"{wpre}.mlp.up_proj.weight", hidden, ffn)
        wd = weight(f"{wpre}.mlp.down_proj.weight", ffn, hidden)
        gate = g.op("MatMul", [x, wg], f"{pre}/mlp/gate_proj")
        up = g.op("MatMul", [x, wu], f"{pre}/mlp/up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{pre}/mlp/act_sigmoid")], f"{pre}/mlp/act_silu")
        m = g.op("Mul", [act, up], f"{pre}/mlp/gated")
        m = g.op("MatMul", [m, wd], f"{pre}/mlp/down_proj")
        h = g.op("Add", [h, m], f"{pre}/mlp_residual")

    h = rmsnorm(h, norm_weight("model.norm.weight"), "model/norm")
    g.op("MatMul", [h, weight("lm_head.weight", hidden, vocab)], "logits")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, [_B, _S]),
        helper.make_tensor_value_info("attention_mask", i64, [_B, _T]),
        helper.make_tensor_value_info("position_ids", i64, [_B, _S]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, [_B, _S, vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, [_B, kv_heads, _P, head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, [_B, kv_heads, _T, head_dim]))

    graph = helper.make_graph(g.nodes, "llama_demo", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kvoverlay.models.demo")
    model.ir_version = 8  # widely readable; opset 18 needs IR >= 8
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


def greedy_decode_ort(model, prompt, new_tokens: int):
    """Greedy decoding with fp32 onnxruntime, feeding the KV cache back (:func:`kvoverlay.host.reference.ort_decode`).

    *model* is a ``ModelProto``, a path or an ``InferenceSession``. Returns ``(tokens, logits)``: the
    *new_tokens* generated token ids and, for each, the last-position logits (float32) it was chosen from.
    """
    from kvoverlay.host.reference import ort_decode

    return ort_decode(model, prompt, new_tokens)
