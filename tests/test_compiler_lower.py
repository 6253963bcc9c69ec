"""Numpy semantics of the lowering registry, op by op, against onnxruntime on single-node models."""

import numpy as np
import onnxruntime as ort
import pytest
from kvoverlay.compiler.interp import run_graph
from kvoverlay.compiler.lower import lower
from onnx import helper

R = np.random.default_rng(0)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def i64(values):
    return np.asarray(values, np.int64)


def _check(op, inputs, n_out=1, opset=18, **attrs):
    """*inputs*: list of arrays (graph inputs) or None (omitted optional input)."""
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    outs = [f"out{i}" for i in range(n_out)]
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
           for n, a in zip(names, inputs, strict=True) if n]
    ovis = [helper.make_empty_tensor_value_info(o) for o in outs]
    node = helper.make_node(op, names, outs, name="under_test", **attrs)
    model = helper.make_model(helper.make_graph([node], "t", vis, ovis), opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    feeds = {n: a for n, a in zip(names, inputs, strict=True) if n}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(outs, feeds)
    got = run_graph(lower(model), feeds)
    for o, w in zip(outs, want, strict=True):
        assert got[o].shape == w.shape, (op, o)
        assert got[o].dtype == w.dtype, (op, o)
        np.testing.assert_allclose(got[o], w, rtol=1e-5, atol=1e-5, err_msg=f"{op} {o}")


CASES = {
    "gemm_trans": ("Gemm", [f32(5, 3), f32(4, 5), f32(4)], 1, 18, {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    "gemm_no_c": ("Gemm", [f32(3, 5), f32(5, 4), None], 1, 18, {}),
    "layernorm_3out": ("LayerNormalization", [f32(2, 3, 8), f32(3, 8), f32(3, 8)], 3, 18, {"axis": -2, "epsilon": 1e-3}),
    "layernorm_nobias": ("LayerNormalization", [f32(2, 8), f32(8)], 1, 18, {}),
    "rmsnorm": ("RMSNormalization", [f32(2, 3, 8), f32(8)], 1, 23, {}),
    "rmsnorm_2axes": ("RMSNormalization", [f32(2, 3, 8), f32(3, 8)], 1, 23, {"axis": 1, "epsilon": 0.1}),
    "split_uneven": ("Split", [f32(7, 2)], 3, 18, {"num_outputs": 3}),
    "split_sizes": ("Split", [f32(2, 7), i64([2, 5])], 2, 18, {"axis": 1}),
    "split_equal_13": ("Split", [f32(6, 2)], 2, 13, {}),
    "flatten": ("Flatten", [f32(2, 3, 4, 5)], 1, 18, {"axis": 2}),
    "flatten_0": ("Flatten", [f32(2, 3, 4)], 1, 18, {"axis": 0}),
    "flatten_neg": ("Flatten", [f32(2, 3, 4)], 1, 18, {"axis": -1}),
    "tile": ("Tile", [f32(2, 3), i64([2, 3])], 1, 18, {}),
    "trilu_lower": ("Trilu", [f32(2, 4, 5), i64(1)], 1, 18, {"upper": 0}),
    "trilu_upper": ("Trilu", [f32(4, 5), i64(-1)], 1, 18, {}),
    "scatternd": ("ScatterND", [f32(4, 3), i64([[1], [3]]), f32(2, 3)], 1, 18, {}),
    "scatternd_add": ("ScatterND", [f32(4, 3), i64([[1, 2], [1, 2]]), f32(2)], 1, 18, {"reduction": "add"}),
    "reducesum": ("ReduceSum", [f32(2, 3, 4), i64([1])], 1, 18, {"keepdims": 0}),
    "reducesum_noop": ("ReduceSum", [f32(2, 3)], 1, 18, {"noop_with_empty_axes": 1}),
    "reducemax": ("ReduceMax", [f32(2, 3, 4), i64([-1])], 1, 18, {}),
    "reducemax_attr": ("ReduceMax", [f32(2, 3, 4)], 1, 13, {"axes": [0, 2], "keepdims": 0}),
    "max": ("Max", [f32(2, 3), f32(3), f32(1, 1)], 1, 18, {}),
    "min": ("Min", [f32(2, 3), f32(3)], 1, 18, {}),
    "sum": ("Sum", [f32(2, 3), f32(3), f32(2, 1)], 1, 18, {}),
    "erf": ("Erf", [f32(3, 4)], 1, 18, {}),
    "gelu": ("Gelu", [f32(3, 4)], 1, 20, {}),
    "gelu_tanh": ("Gelu", [f32(3, 4)], 1, 20, {"approximate": "tanh"}),
    "clip_min": ("Clip", [f32(3, 4), np.array(-0.2, np.float32), None], 1, 18, {}),
    "clip_both": ("Clip", [f32(3, 4), np.array(-0.2, np.float32), np.array(0.3, np.float32)], 1, 18, {}),
    "mod_int": ("Mod", [i64([-7, 7, -7, 5]), i64([3, -3, -3, 5])], 1, 18, {}),
    "fmod": ("Mod", [f32(5) * 4, np.float32([1.5, -1.5, 2, 3, -0.7])], 1, 18, {"fmod": 1}),
    "cos": ("Cos", [f32(5)], 1, 18, {}),
    "sin": ("Sin", [f32(5)], 1, 18, {}),
    "isnan": ("IsNaN", [np.float32([0, np.nan, 1])], 1, 18, {}),
    "log": ("Log", [np.abs(f32(5)) + 0.1], 1, 18, {}),
    "floor_ceil": ("Floor", [f32(5) * 3], 1, 18, {}),
    "rope_3d_partial": ("RotaryEmbedding", [f32(2, 3, 16), f32(10, 2), f32(10, 2), i64([[0, 4, 9], [1, 2, 3]])], 1, 23,
                        {"num_heads": 2, "rotary_embedding_dim": 4}),
    "rope_4d_interleaved": ("RotaryEmbedding", [f32(1, 2, 3, 8), f32(6, 4), f32(6, 4), i64([[5, 0, 2]])], 1, 23,
                            {"interleaved": 1}),
    "attention_3d_gqa_causal": ("Attention", [f32(1, 3, 32), f32(1, 3, 16), f32(1, 3, 16)], 1, 23,
                                {"q_num_heads": 4, "kv_num_heads": 2, "is_causal": 1}),
    "attention_4d_past_mask_softcap": ("Attention", [f32(2, 4, 2, 8), f32(2, 1, 2, 8), f32(2, 1, 2, 8), f32(2, 1, 2, 5),
                                                     f32(2, 1, 3, 8), f32(2, 1, 3, 8)], 3, 23,
                                       {"softcap": 2.0, "scale": 0.3}),
    "attention_bool_mask_causal_past": ("Attention", [f32(1, 2, 1, 8), f32(1, 2, 1, 8), f32(1, 2, 1, 8),
                                                      np.array([[[[True, False, True, True, True]]]]),
                                                      f32(1, 2, 4, 8), f32(1, 2, 4, 8)], 3, 23, {"is_causal": 1}),
}


@pytest.mark.parametrize("case", CASES)
def test_op_matches_onnxruntime(case):
    op, inputs, n_out, opset, attrs = CASES[case]
    _check(op, inputs, n_out, opset, **attrs)
