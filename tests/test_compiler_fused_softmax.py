"""ONNX Softmax, Sigmoid and Tanh on the attention unit (``compiler/fused/softmax.py``), against onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.session import run_graph
from onnx import TensorProto, helper

RNG = np.random.default_rng(13)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_runs_on_the_attention_unit(axis):
    """Keys [x_j, 0...], one-hot values, one ATTN per group of the axis."""
    node = helper.make_node("Softmax", ["x"], ["y"], axis=axis)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 5])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    b, _ = compile_model(model, "tiny", weights="w16")
    groups = 60 // [3, 4, 5][axis]
    assert [i.op for i in b.instructions].count("ATTN") == groups
    x = (3 * RNG.standard_normal((3, 4, 5))).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_graph(b, {"x": x})["y"], want, atol=2e-3 * float(np.max(want)), rtol=0)


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh"])
def test_sigmoid_and_tanh_are_two_element_softmaxes(op):
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 20])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 20])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    b, _ = compile_model(model, "tiny", weights="w16")
    assert [i.op for i in b.instructions].count("ATTN") == 40
    x = (2 * RNG.standard_normal((2, 20))).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_graph(b, {"x": x})["y"], want, atol=2e-3, rtol=0)
