"""kvoverlay as an onnx.backend: ONNX's own BackendTest runs unchanged over the node cases the overlay passes today,
and the adapter binds constant operands only when the compiler needs them."""

import re
import warnings

import numpy as np
import onnx
import onnx.backend.test
import pytest
from kvoverlay.host.onnx_backend import OverlayBackend
from onnx import TensorProto, helper

from kvoverlay import onnx_backend

# ONNX's harness, unchanged: it builds one unittest case per node case and compares at the case's own tolerance.
# Its classes carry a method for every case of every device; only the selected ones are kept, so that the report
# lists what ran instead of thousands of skips.
_SELECTED = r"^test_(neg|neg_example|reshape_reordered_all_dims|reshape_negative_dim|unsqueeze_axis_0|squeeze)_cpu$"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the case generators' own numpy overflow notices
    _suite = onnx.backend.test.BackendTest(OverlayBackend, __name__)
    _cases = _suite.include(_SELECTED).test_cases
for _cls in _cases.values():
    for _name in [n for n in vars(_cls) if n.startswith("test_") and not re.match(_SELECTED, n)]:
        delattr(_cls, _name)
globals().update(_cases)


def _add_model():
    nodes = [helper.make_node("Add", ["x", "y"], ["z"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 16]) for n in ("x", "y")]
    vo = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16])]
    return helper.make_model(helper.make_graph(nodes, "g", vi, vo), opset_imports=[helper.make_opsetid("", 18)])


def test_float_inputs_run_as_vectors_without_binding():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1, 16)).astype(np.float32), rng.standard_normal((1, 16)).astype(np.float32)
    rep = onnx_backend.prepare(_add_model(), "CPU")
    (z,) = rep.run([x, y])
    assert rep.bound == []
    assert sorted(rep.program.manifest["io"]["inputs"]) == ["x", "y"]
    np.testing.assert_allclose(z, x + y, atol=2.0 ** -10 * np.abs(x + y).max())


def test_a_weight_operand_is_bound_at_run_time():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"])]
    vi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [16, 8])]
    vo = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])]
    model = helper.make_model(helper.make_graph(nodes, "g", vi, vo), opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((1, 16)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    rep = onnx_backend.prepare(model)
    (z,) = rep.run({"x": x, "w": w})
    assert rep.bound == ["w"]
    np.testing.assert_allclose(z, x @ w, atol=2.0 ** -9 * np.abs(x @ w).max())


def test_devices():
    assert onnx_backend.supports_device("CPU") and onnx_backend.supports_device("RTL")
    assert not onnx_backend.supports_device("CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        onnx_backend.prepare(_add_model(), "CUDA")


def _erf_model(domain=""):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    node = helper.make_node("Erf", ["x"], ["y"], name="e", domain=domain)
    ops = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=ops)


def test_an_op_the_overlay_lacks_runs_on_the_host_and_the_rep_says_so():
    rep = onnx_backend.prepare(_erf_model())
    x = np.linspace(-2, 2, 16, dtype=np.float32).reshape(2, 8)
    (y,) = rep.run([x])
    assert rep.host == [["e", "Erf"]]
    want = np.vectorize(__import__("math").erf)(x.astype(np.float64))
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)  # all of it on the host: float32 exact


def test_prepare_refuses_an_op_no_one_runs_with_compiles_one_line_error():
    from kvoverlay.compiler.frontend import CompileError

    with pytest.raises(CompileError, match=r"^node e: op custom\.Erf \(opset 17\) is not supported; supported: "):
        onnx_backend.prepare(_erf_model("custom"))
    rep = onnx_backend.prepare(_erf_model(), offload_device="none")  # Erf has numpy semantics: compiles, then
    with pytest.raises(CompileError, match="node e: op Erf .* cannot run on the overlay"):  # fuse refuses it
        rep.run([np.zeros((2, 8), np.float32)])


def _one_passing_case_per_op():
    from kvoverlay.host import conformance

    picked = {}
    for op, case in conformance.collect():
        if (op not in picked and not conformance._not_applicable(case)
                and conformance.run_case(op, case).outcome in ("overlay", "host")):
            picked[op] = case
    return picked


def test_rtl_device_is_bit_exact_with_the_golden_model_on_one_case_per_op():
    from kvoverlay.host.onnx_backend import prepare

    picked = _one_passing_case_per_op()
    assert {"Attention", "MatMul", "Concat", "RMSNormalization", "Gelu"} <= set(picked)
    for op, case in picked.items():
        inputs = list(case.data_sets[0][0])
        isa_rep, rtl_rep = prepare(case.model, "CPU"), prepare(case.model, "RTL")
        golden = isa_rep.run(inputs)
        rtl = rtl_rep.run(inputs)
        for g, r in zip(golden, rtl, strict=True):
            np.testing.assert_array_equal(r, g, err_msg=f"{op}: {case.name}")


def test_a_float_input_holding_minus_infinity_is_bound_not_written_as_a_vector():
    nodes = [helper.make_node("Add", ["x", "mask"], ["s"]), helper.make_node("Softmax", ["s"], ["z"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8]) for n in ("x", "mask")]
    vo = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])]
    model = helper.make_model(helper.make_graph(nodes, "g", vi, vo), opset_imports=[helper.make_opsetid("", 18)])
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    mask = np.where(np.arange(8) < 5, 0.0, -np.inf).astype(np.float32)[None].repeat(2, 0)
    rep = onnx_backend.prepare(model)
    (z,) = rep.run([x, mask])
    assert rep.bound == ["mask"]
    want = np.exp(x + mask - (x + mask).max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(z, want, atol=2.0 ** -10)
