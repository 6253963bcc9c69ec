"""ONNX Attention without past KV on the overlay (``compiler/fused/attention_rows.py``): KVAPPEND per key row and
one ATTN per query row, against onnxruntime; what ATTN cannot attend is refused with the reason."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.frontend import CompileError
from kvoverlay.host.session import run_graph
from onnx import TensorProto, helper

RNG = np.random.default_rng(11)


def _attention(q, k, v, opset=23, **attrs):
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], **attrs)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("Q", q), ("K", k), ("V", v))]
    g = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))
    onnx.checker.check_model(m)
    return m


CASES = {
    "4d": (([2, 3, 4, 8], [2, 3, 6, 8], [2, 3, 6, 8]), {}),
    "4d_causal_scaled": (([2, 3, 4, 8], [2, 3, 4, 8], [2, 3, 4, 8]), {"is_causal": 1, "scale": 0.2}),
    "3d_gqa": (([1, 3, 32], [1, 5, 16], [1, 5, 16]), {"q_num_heads": 4, "kv_num_heads": 2}),
    "4d_v_head_wider": (([1, 2, 3, 8], [1, 2, 5, 8], [1, 2, 5, 12]), {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_runs_on_the_overlay(name):
    shapes, attrs = CASES[name]
    model = _attention(*shapes, **attrs)
    b, _ = compile_model(model, "tiny", weights="w16")
    ops = [i.op for i in b.instructions]
    batch, kv_rows = shapes[1][0], shapes[1][-2 if len(shapes[1]) == 4 else 1]
    q_rows = shapes[0][-2 if len(shapes[0]) == 4 else 1]
    assert ops.count("KVAPPEND") == batch * kv_rows and ops.count("ATTN") == batch * q_rows
    feeds = {n: RNG.standard_normal(s).astype(np.float32) for n, s in zip("QKV", shapes, strict=True)}
    got = run_graph(b, feeds)["Y"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-3 * float(np.max(np.abs(want))), rtol=0)


@pytest.mark.parametrize(("attrs", "why"), [({"softcap": 2.0}, "softcap"),
                                            ({"is_causal": 1, "left_window_size": 1, "opset": 25}, "sliding window")])
def test_what_attn_cannot_attend_is_refused(attrs, why):
    with pytest.raises(CompileError, match=why):
        compile_model(_attention([1, 2, 3, 8], [1, 2, 3, 8], [1, 2, 3, 8], **attrs), "tiny", host_ops=False)


def test_past_kv_present_outputs_and_a_float_mask_per_head_run_on_the_overlay():
    """GQA with a past KV given as inputs, present outputs, a float mask that differs per head and masks some keys
    (-inf), and is_causal bottom-right aligned with the past: all on the overlay, against onnxruntime."""
    b_, qh, kvh, sq, past, d = 1, 4, 2, 3, 2, 8
    mask = RNG.standard_normal((b_, qh, sq, past + sq)).astype(np.float32)
    mask[0, 1, 0, 0] = -np.inf
    node = helper.make_node("Attention", ["Q", "K", "V", "M", "PK", "PV"], ["Y", "PKo", "PVo"], is_causal=1)
    shapes = {"Q": [b_, qh, sq, d], "K": [b_, kvh, sq, d], "V": [b_, kvh, sq, d], "PK": [b_, kvh, past, d],
              "PV": [b_, kvh, past, d]}
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "PKo", "PVo")]
    g = helper.make_graph([node], "g", ins, outs, [onnx.numpy_helper.from_array(mask, "M")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]))
    b, _ = compile_model(model, "tiny", host_ops=False)
    assert "ATTN" in [i.op for i in b.instructions]
    feeds = {n: RNG.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    got = run_graph(b, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, want in zip(("Y", "PKo", "PVo"), sess.run(None, feeds), strict=True):
        np.testing.assert_allclose(got[name], want, atol=2e-3 * float(np.max(np.abs(want))), rtol=0, err_msg=name)

