"""Host segments: a partitioned program runs through run_graph, its host ops on torch or ONNX's numpy reference."""

import math

import numpy as np
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host import placement
from kvoverlay.host.session import SessionError, run_graph
from onnx import TensorProto, helper

RNG = np.random.default_rng(3)


def _erf_between():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])
    nodes = [helper.make_node("Mul", ["x", "x"], ["a"], name="sq"), helper.make_node("Erf", ["a"], ["b"], name="erf"),
             helper.make_node("Add", ["b", "x"], ["z"], name="res")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [z]), opset_imports=[helper.make_opsetid("", 17)])


def test_a_program_with_a_host_op_runs_on_the_golden_model_within_the_block_bound():
    b, _ = compile_model(_erf_between(), "tiny")
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    want = np.vectorize(math.erf)(x.astype(np.float64) ** 2) + x
    got = run_graph(b, {"x": x})["z"]
    assert np.abs(got - want).max() <= 2.0 ** -10 * np.abs(want).max()


def test_offload_device_none_names_what_did_not_fit():
    b, _ = compile_model(_erf_between(), "tiny")
    with pytest.raises(SessionError, match=r"--offload-device none: .*1 op\(s\) on the host.*erf \(Erf\)"):
        run_graph(b, {"x": np.zeros((2, 8), np.float32)}, offload_device="none")


def test_torch_and_numpy_reference_agree_on_a_host_segment():
    pytest.importorskip("torch")
    b, _ = compile_model(_erf_between(), "tiny")
    seg = next(s for s in b.manifest["segments"] if s["kind"] == "host")
    blob = b.image[seg["blob"][0]:sum(seg["blob"])]
    a = RNG.standard_normal((2, 8)).astype(np.float32)
    on_torch = placement.HostSegment(blob, "cpu")
    got = on_torch.run({"a": a})["b"]
    assert on_torch.ran_on == "torch:cpu"
    ref = placement.HostSegment(blob, "cpu")
    ref._torch = None  # ONNX's numpy reference, as without torch
    want = ref.run({"a": a})["b"]
    assert ref.ran_on == "numpy"
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
