"""Compiler frontend/lowering/folding: demo model through all passes, checked against onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kvoverlay.compiler.frontend import CompileError, load_model
from kvoverlay.compiler.interp import run_graph
from kvoverlay.compiler.lower import lower
from kvoverlay.compiler.passes import PIPELINE, run_passes
from kvoverlay.models.demo import build_llama_onnx
from onnx import TensorProto, helper

KV = 5


@pytest.fixture(scope="module")
def model():
    return build_llama_onnx()


#: The passes run_passes runs: frontend to dead_code.
GRAPH_PASSES = PIPELINE[:[p.name for p in PIPELINE].index("dead_code") + 1]


def test_passes_fold_and_match_ort(model, tmp_path):
    g = run_passes(model, tmp_path, kv_len=KV)
    ops = {n.op for n in g.nodes}
    assert not ops & {"Shape", "Range", "ConstantOfShape", "Equal", "Where", "Cast", "LessOrEqual", "And"}
    assert {"MatMul", "Softmax", "Sigmoid", "ReduceMean", "Concat", "Gather"} <= ops
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:02d}_{p.name}.txt" for i, p in enumerate(GRAPH_PASSES)]
    rng = np.random.default_rng(1)
    feeds = {"input_ids": np.array([[7]], np.int64), "position_ids": np.array([[KV]], np.int64)}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, 2, KV, 16)).astype(np.float32)
    got = run_graph(g, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    want = dict(zip(names, sess.run(names, {**feeds, "attention_mask": np.ones((1, KV + 1), np.int64)}), strict=True))
    for n in names:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-4, atol=1e-4)


def test_symbolic_past_keeps_p(model):
    m = load_model(model)
    dims = [d.dim_param for d in m.graph.input[3].type.tensor_type.shape.dim]
    assert "P" in dims
    g = lower(m)
    assert g.values["past_key_values.0.key"].shape == (1, 2, "P", 16)


def _tiny(op="Identity", in_dims=("batch_size", 4), out_dims=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(in_dims if out_dims is None else out_dims))
    node = helper.make_node(op, ["x"], ["y"], name="my_node")
    return helper.make_model(helper.make_graph([node], "t", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])


def test_unsupported_op():
    with pytest.raises(CompileError) as e:
        lower(load_model(_tiny("Det", ("batch_size", 3, 3), ("batch_size",))))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("node my_node: op Det (opset 18) is not supported; supported: ")


def test_unpinnable_dim():
    with pytest.raises(CompileError, match=r"input 'x': dimension 1 \('hidden_dyn'\) cannot be pinned"):
        load_model(_tiny(in_dims=("batch_size", "hidden_dyn")))


def test_external_data_escape_refused(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    m = _tiny("Add")
    m.graph.node[0].input.append("w")
    m.graph.initializer.append(w)
    (tmp_path / "evil.bin").write_bytes(np.ones(4, np.float32).tobytes())
    sub = tmp_path / "sub"
    sub.mkdir()
    w = m.graph.initializer[0]
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../evil.bin"), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = k, v
    (sub / "model.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(CompileError, match=r"initializer 'w': external data location '\.\./evil\.bin' escapes"):
        load_model(sub / "model.onnx")
    # the same data inside the folder loads
    w.external_data[0].value = "ok.bin"
    (sub / "ok.bin").write_bytes(np.ones(4, np.float32).tobytes())
    (sub / "model.onnx").write_bytes(m.SerializeToString())
    assert isinstance(load_model(sub / "model.onnx"), onnx.ModelProto)
