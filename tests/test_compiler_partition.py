"""The partition pass: nodes the overlay refuses go to host segments, in phases, and the rest stays one program."""

import numpy as np
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.frontend import CompileError
from onnx import TensorProto, helper

from kvoverlay import bundle as kvbundle


def _model(nodes, outputs=("z",), opset=17, out_shape=(2, 8)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(out_shape)) for o in outputs]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outs), opset_imports=[helper.make_opsetid("", opset)])


def _erf_between():
    return _model([helper.make_node("Mul", ["x", "x"], ["a"], name="sq"),
                   helper.make_node("Erf", ["a"], ["b"], name="erf"),
                   helper.make_node("Add", ["b", "x"], ["z"], name="res")])


def test_an_op_the_overlay_lacks_is_placed_on_the_host_between_two_overlay_segments():
    b, report = compile_model(_erf_between(), "tiny")
    segs = b.manifest["segments"]
    assert [s["kind"] for s in segs] == ["overlay", "host", "overlay"]
    assert b.manifest["placement"]["host"] == [["erf", "Erf"]]
    assert report["placement"]["host"] == [["erf", "Erf"]]
    # tensors cross once per boundary: the host reads the overlay's a, the last overlay segment b and x
    assert (segs[1]["inputs"], segs[1]["outputs"]) == (["a"], ["b"])
    assert sorted(segs[2]["inputs"]) == ["b", "x"] and segs[2]["outputs"] == ["z"]
    assert report["instructions"] > 0
    again = kvbundle.from_bytes(kvbundle.to_bytes(b))  # loads without pickle, byte-stable
    assert kvbundle.to_bytes(again) == kvbundle.to_bytes(b)


def test_two_host_ops_in_a_row_form_one_host_segment():
    m = _model([helper.make_node("Sqrt", ["x"], ["a"], name="s"), helper.make_node("Erf", ["a"], ["b"], name="e"),
                helper.make_node("Neg", ["b"], ["z"], name="n")])
    b, _ = compile_model(m, "tiny")
    assert [s["kind"] for s in b.manifest["segments"]] == ["host", "overlay"]
    assert b.manifest["placement"]["host"] == [["s", "Sqrt"], ["e", "Erf"]]


def test_without_an_offload_device_the_refusal_stays_the_one_line_error():
    with pytest.raises(CompileError, match=r"node erf: op Erf \(opset 17\) cannot run on the overlay"):
        compile_model(_erf_between(), "tiny", host_ops=False)


def test_a_graph_the_overlay_runs_whole_has_no_segments():
    m = _model([helper.make_node("Mul", ["x", "x"], ["z"])])
    b, _ = compile_model(m, "tiny")
    assert "segments" not in b.manifest and b.manifest["placement"]["host"] == []
    assert b.instructions


def test_an_op_without_numpy_semantics_in_the_compiler_goes_to_the_host():
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 1, 0, 1])
    m = _model([helper.make_node("Constant", [], ["p"], value=pads), helper.make_node("Pad", ["x", "p"], ["z"])],
               out_shape=(2, 10))
    b, _ = compile_model(m, "tiny")
    assert [op for _, op in b.manifest["placement"]["host"]] == ["Pad"]
    with pytest.raises(CompileError, match="op Pad .* is not supported"):
        compile_model(m, "tiny", host_ops=False)


def test_a_mask_of_minus_infinity_keeps_its_region_on_the_host():
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [8], [0.0, -np.inf] * 4)
    m = _model([helper.make_node("Constant", [], ["c"], value=bias), helper.make_node("Add", ["x", "c"], ["s"]),
                helper.make_node("Softmax", ["s"], ["z"])])
    b, _ = compile_model(m, "tiny")
    assert [op for _, op in b.manifest["placement"]["host"]] == ["Add", "Softmax"]


def test_a_region_undefined_on_part_of_the_probe_is_no_activation_and_goes_to_the_host():
    # sqrt(x) * x is nan for x < 0: the activation rule's probe must not take it for SiLU
    m = _model([helper.make_node("Sqrt", ["x"], ["a"], name="s"), helper.make_node("Mul", ["a", "x"], ["z"], name="m")])
    b, _ = compile_model(m, "tiny")
    assert b.manifest["placement"]["host"] == [["s", "Sqrt"]]
    from kvoverlay.host.session import run_graph

    x = np.full((2, 8), 4.0, np.float32)
    np.testing.assert_allclose(run_graph(b, {"x": x})["z"], 8.0, rtol=2.0 ** -10)


def _masked_softmax_model(mask, rows=2, pad=0):
    """ONNX Attention's function body in small: scores + an additive mask, softmax, rows the mask covers whole
    replaced by zeros (a ``Where`` on the mask's row max), then a GEMV; with *pad*, the mask is widened by that many
    columns of -inf by a ``Pad`` (an op the compiler has no numpy semantics for), as the body does for a short mask."""
    n = mask.shape[-1] + pad
    c = helper.make_tensor("mask", TensorProto.FLOAT, list(mask.shape), mask.reshape(-1).tolist())
    w = helper.make_tensor("w", TensorProto.FLOAT, [n, 8], np.linspace(-1, 1, n * 8).tolist())
    ax = helper.make_tensor("ax", TensorProto.INT64, [1], [-1])
    ninf = helper.make_tensor("ninf", TensorProto.FLOAT, [], [-np.inf])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 0, 0, pad])
    nodes = [helper.make_node("Constant", [], [k], value=t) for k, t in
             (("m0", c), ("wc", w), ("axes", ax), ("ni", ninf), ("z0", zero), ("pp", pads))]
    nodes += [helper.make_node("Pad", ["m0", "pp", "ni"], ["m"], name="pad") if pad else
              helper.make_node("Identity", ["m0"], ["m"], name="mask")]
    nodes += [helper.make_node("Add", ["x", "m"], ["s"], name="add"),
              helper.make_node("Softmax", ["s"], ["p"], name="softmax"),
              helper.make_node("ReduceMax", ["m", "axes"], ["rm"], name="rowmax"),
              helper.make_node("Equal", ["rm", "ni"], ["dead"], name="dead"),
              helper.make_node("Where", ["dead", "z0", "p"], ["safe"], name="safe"),
              helper.make_node("MatMul", ["safe", "wc"], ["z"], name="pv")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, n])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [rows, 8])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [z]), opset_imports=[helper.make_opsetid("", 18)])


def test_a_fully_masked_row_keeps_the_region_up_to_its_where_on_the_host():
    import onnxruntime as ort
    from kvoverlay.host.session import run_graph

    mask = np.array([[0.0] * 4 + [-np.inf] * 4, [-np.inf] * 8], np.float32)  # row 1 all masked: its softmax is nan
    m = _masked_softmax_model(mask)
    b, _ = compile_model(m, "tiny")
    # the nan rows never become a vector: the Where that zeroes them runs on the host too; the GEMV after it does not
    assert b.manifest["placement"]["host"] == [["add", "Add"], ["softmax", "Softmax"], ["safe", "Where"]]
    assert [s["kind"] for s in b.manifest["segments"]] == ["host", "overlay"]
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    got = run_graph(b, {"x": x})["z"]
    np.testing.assert_array_equal(got[1], 0.0)
    np.testing.assert_allclose(got, want, atol=2.0 ** -10 * np.abs(want).max())


def test_an_op_without_numpy_semantics_in_a_masked_region_is_probed_through_onnx_reference():
    import onnxruntime as ort
    from kvoverlay.host.session import run_graph

    mask = np.array([[0.0] * 4 + [-np.inf] * 2, [-np.inf] * 6], np.float32)
    m = _masked_softmax_model(mask, pad=2)
    b, _ = compile_model(m, "tiny")
    # the padded mask is known to the probe (what reads it is on the host), so the GEMV after the Where is not
    assert [n for n, _ in b.manifest["placement"]["host"]] == ["pad", "add", "softmax", "rowmax", "dead", "safe"]
    assert b.manifest["segments"][-1]["kind"] == "overlay"
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_graph(b, {"x": x})["z"], want, atol=2.0 ** -10 * np.abs(want).max())


def test_a_partly_masked_softmax_is_finite_and_its_readers_go_back_to_the_overlay():
    mask = np.array([[0.0] * 4 + [-np.inf] * 4, [0.0] * 8], np.float32)  # no row all masked
    b, _ = compile_model(_masked_softmax_model(mask), "tiny")
    assert b.manifest["placement"]["host"] == [["add", "Add"], ["softmax", "Softmax"]]


def test_a_layout_too_big_for_the_image_goes_to_the_host_not_the_whole_compile():
    # a softmax over 72 rows of 18 is 72 ATTN groups, each cut out and put back by layout GEMVs of the whole tensor
    shape = [2, 9, 4, 18]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)
    nodes = [helper.make_node("Softmax", ["x"], ["s"], name="sm"), helper.make_node("Neg", ["s"], ["z"], name="neg")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [z]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(CompileError, match=r"the program image needs \d+ bytes; tiny has dram_bytes="):
        compile_model(m, "tiny", host_ops=False)
    b, _ = compile_model(m, "tiny")
    assert b.manifest["placement"]["host"] == [["sm", "Softmax"]]
