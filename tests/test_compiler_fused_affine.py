"""Layout and linear ops of small tensors (``compiler/fused/affine.py``), per-row norms, and the precise refusals
(``compiler/fused/refused.py``): compiled for tiny in w16, run on the golden model, held against onnxruntime.

The bound is the graphs test's: 5e-4 of each output's peak (a 0/1 GEMV requantizes a 16-bit block-floating-point
vector; a per-row norm's rows are summed into one block, so a small row keeps the large row's exponent).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.frontend import CompileError
from kvoverlay.host.session import run_graph
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(5)


def _model(nodes, inputs, outputs, inits=(), opset=18):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    g = helper.make_graph(nodes, "g", vi, vo, [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))
    onnx.checker.check_model(m)
    return m


def _i64(*v):
    return np.asarray(v, np.int64)


GRAPHS = {
    "concat_transpose": lambda: _model(
        [helper.make_node("Concat", ["x", "y"], ["c"], axis=1), helper.make_node("Transpose", ["c"], ["z"], perm=[1, 0])],
        [("x", [3, 4]), ("y", [3, 2])], ["z"]),
    "slice_gather_expand": lambda: _model(
        [helper.make_node("Slice", ["x", "st", "en", "ax"], ["s"]), helper.make_node("Gather", ["s", "ix"], ["g"], axis=1),
         helper.make_node("Expand", ["g", "sh"], ["z"])],
        [("x", [2, 6])], ["z"], [("st", _i64(1)), ("en", _i64(5)), ("ax", _i64(1)), ("ix", _i64(3, 0, 0)),
                                 ("sh", _i64(3, 2, 3))]),
    "bcast_add_reduce_mean": lambda: _model(
        [helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("ReduceMean", ["a", "ax"], ["z"], keepdims=0)],
        [("x", [3, 4, 5])], ["z", "a"], [("c", RNG.standard_normal(5).astype(np.float32)), ("ax", _i64(-1))]),
    "batched_matmul": lambda: _model(
        [helper.make_node("MatMul", ["x", "w"], ["z"])],
        [("x", [2, 3, 4])], ["z"], [("w", RNG.standard_normal((4, 5)).astype(np.float32))]),
    "layernorm_rows": lambda: _model(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["z"], axis=-2, epsilon=1e-5)],
        [("x", [2, 3, 4])], ["z"], [("g", 1 + 0.2 * RNG.standard_normal((3, 4)).astype(np.float32)),
                                    ("b", 0.2 * RNG.standard_normal((3, 4)).astype(np.float32))], opset=17),
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_small_tensor_graph_matches_onnxruntime(name):
    model = GRAPHS[name]()
    b, _ = compile_model(model, "tiny", weights="w16")
    assert any(i.op == "GEMV" for i in b.instructions)  # the layout work runs on the overlay
    feeds = {i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    got = run_graph(b, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    for k, ref in want.items():
        assert got[k].shape == ref.shape
        np.testing.assert_allclose(got[k], ref, atol=5e-4 * float(np.max(np.abs(ref))), rtol=0)


def test_nonlinear_op_outside_the_instruction_set_names_the_reason():
    m = _model([helper.make_node("Erf", ["x"], ["z"])], [("x", [2, 8])], ["z"])
    with pytest.raises(CompileError, match="Erf.*ACT computes only x \\* gate"):
        compile_model(m, "tiny", host_ops=False)


def test_layernorm_inv_std_dev_output_is_refused_with_the_reason():
    m = _model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean", "isd"])], [("x", [2, 8])],
               ["y", "mean", "isd"], [("g", np.ones(8, np.float32))], opset=17)
    with pytest.raises(CompileError, match="InvStdDev"):
        compile_model(m, "tiny", host_ops=False)
