"""Small graphs of supported ops (not decoders) compile and run, held against onnxruntime.

Inputs are written by the host as vector records each run, every output is stored; the numerics are the
overlay's (bfp16 activations, w16 weights, Q1.15 gate tables), so agreement is to 5e-4 of each output's peak
(measured: 5e-5 typically, 2.4e-4 where RMSNorm(x) - x cancels).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.frontend import CompileError
from kvoverlay.host.session import Session, SessionError, run_graph
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(3)
N = 64


def _model(nodes, inputs, outputs, inits=(), opset=18):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 32 if n == "z32" else N]) for n in outputs]
    m = helper.make_model(helper.make_graph(nodes, "g", vi, vo, [numpy_helper.from_array(np.asarray(v, np.float32), k)
                                                                  for k, v in inits]),
                          opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return m


def _w(*shape, scale=0.2):
    return RNG.standard_normal(shape) * scale


GRAPHS = {
    "add_mul": (lambda: _model([helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("Mul", ["s", "x"], ["z"])],
                               [("x", [1, N]), ("y", [1, N])], ["z", "s"])),
    "linear_bias_silu": (lambda: _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
         helper.make_node("Sigmoid", ["hb"], ["g"]), helper.make_node("Mul", ["hb", "g"], ["z"])],
        [("x", [1, N])], ["z"], [("w", _w(N, N)), ("b", _w(N))])),
    "gemm_transb_scaled": (lambda: _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["z32"], transB=1, alpha=0.5, beta=2.0)],
        [("x", [1, N])], ["z32"], [("w", _w(32, N)), ("b", _w(32))])),
    "layernorm_gelu": (lambda: _model(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], epsilon=1e-5), helper.make_node("Gelu", ["n"], ["z"])],
        [("x", [1, N])], ["z"], [("g", 1 + _w(N)), ("b", _w(N))], opset=20)),
    "rmsnorm_op_residual": (lambda: _model(
        [helper.make_node("RMSNormalization", ["x", "g"], ["n"], epsilon=1e-6), helper.make_node("Sub", ["n", "x"], ["z"])],
        [("x", [1, N])], ["z"], [("g", 1 + _w(N))], opset=23)),
    # ReLU around 0 and with small inputs (x / 64): the compiler's 2**20 pre-scale keeps ACT's step exact
    "linear_relu_small": (lambda: _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Mul", ["r", "c"], ["z"])],
        [("x", [1, N])], ["z"], [("w", _w(N, N, scale=1 / 64)), ("c", 3.0)])),
    "scalar_ops": (lambda: _model(
        [helper.make_node("Div", ["x", "c"], ["d"]), helper.make_node("Neg", ["d"], ["e"]),
         helper.make_node("Sub", ["k", "e"], ["z"])],
        [("x", [1, N])], ["z"], [("c", 4.0), ("k", 0.25)])),
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_small_graph_matches_onnxruntime(name):
    model = GRAPHS[name]()
    b, _ = compile_model(model, "tiny", weights="w16")
    feeds = {i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    got = run_graph(b, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    assert set(got) == set(want)
    for k, ref in want.items():
        scale = float(np.max(np.abs(ref)))
        print(f"{name} {k}: max |err| / peak = {np.max(np.abs(got[k] - ref)) / scale:.2e}")
        np.testing.assert_allclose(got[k], ref, atol=5e-4 * scale, rtol=0)


def test_graph_program_is_not_a_decoder():
    b, _ = compile_model(GRAPHS["add_mul"](), "tiny")
    with pytest.raises(SessionError, match="run_graph"):
        Session(b)
    with pytest.raises(SessionError, match="missing inputs: y"):
        run_graph(b, {"x": np.zeros((1, N))})
    with pytest.raises(SessionError, match="shape"):
        run_graph(b, {"x": np.zeros((N,)), "y": np.zeros((1, N))})


def test_integer_input_is_refused_on_the_overlay_and_cast_on_the_host():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT), helper.make_node("Mul", ["f", "f"], ["z"])], "g",
        [helper.make_tensor_value_info("i", TensorProto.INT32, [1, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(CompileError, match="Cast"):
        compile_model(m, "tiny", host_ops=False)
    b, _ = compile_model(m, "tiny")  # with an offload device the Cast of the integer input runs on the host
    assert [op for _, op in b.manifest["placement"]["host"]] == ["Cast"]
    i = np.arange(-4, 4, dtype=np.int32).reshape(1, 8)
    np.testing.assert_array_equal(run_graph(b, {"i": i})["z"], (i * i).astype(np.float64))
    with pytest.raises(SessionError, match="shape"):
        run_graph(b, {"i": i.reshape(8)})
