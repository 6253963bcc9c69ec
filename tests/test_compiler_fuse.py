"""Fusion: what each exported graph becomes, and that the fused program computes what onnxruntime does."""

import numpy as np
import pytest
from conftest import FAMILIES
from kvoverlay.compiler.frontend import CompileError
from kvoverlay.compiler.fuse import fuse, run_float
from kvoverlay.compiler.passes import run_passes
from kvoverlay.host.reference import ort_decode
from kvoverlay.models.demo import build_llama_onnx

PROMPT = [5, 17, 42]


def test_demo_model_fuses_to_one_op_per_layer_piece():
    og = fuse(run_passes(build_llama_onnx(), kv_len=5), max_seq=16)
    kinds = [op.kind for op in og.ops]
    per_layer = ["norm", "linear", "rope", "linear", "rope", "linear", "attn", "linear", "add", "norm", "linear", "act",
                 "linear", "mul", "linear", "add"]
    # the token row, then cos/sin rows (loaded once for all layers), then two layers and the head
    assert kinds[:1] == ["table"] and kinds.count("table") == 3
    body = [k for k in kinds[1:] if k != "table"]
    assert body == per_layer * 2 + ["norm", "linear"]
    assert sorted(og.kv) == [0, 1] and all(v["kv_heads"] == 2 and v["head_dim"] == 16 for v in og.kv.values())
    assert [op.attrs["func"] for op in og.ops if op.kind == "act"] == ["silu", "silu"]
    assert all(op.attrs["scale"] == pytest.approx(0.25) for op in og.ops if op.kind == "attn")


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_program_in_float64_matches_onnxruntime(exported_models, family):
    """Fusion is exact: only quantization and the overlay's numerics separate the program from the model."""
    model = str(exported_models[family])
    og = fuse(run_passes(model, kv_len=5), max_seq=32)
    tokens, ref = ort_decode(model, PROMPT, 8)
    got = run_float(og, PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(r))))


def test_gpt2_uses_layernorm_gelu_tanh_and_split_qkv(exported_models):
    og = fuse(run_passes(str(exported_models["gpt2"]), kv_len=5), max_seq=32)
    assert {op.attrs["kind"] for op in og.ops if op.kind == "norm"} == {"layer"}
    assert {op.attrs["func"] for op in og.ops if op.kind == "act"} == {"gelu_tanh"}
    assert sum(kind == "position" for kind, _ in og.tables.values()) == 1  # learned positions are a table
    assert not any(op.kind == "rope" for op in og.ops)


def test_qwen2_biases_and_mqa(exported_models):
    og = fuse(run_passes(str(exported_models["qwen2"]), kv_len=5), max_seq=32)
    assert all(v["kv_heads"] == 1 for v in og.kv.values())
    assert sum(op.kind == "addc" for op in og.ops) == 3 * len(og.kv)  # q, k and v biases per layer


def test_unsupported_op_message_lists_what_is_supported():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", 8])
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    emb = numpy_helper.from_array(np.ones((8, 8), np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
             helper.make_node("Softsign", ["y"], ["logits"], name="odd_activation")]
    m = helper.make_model(helper.make_graph(nodes, "g", [ids], [out], [w, emb]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(m)
    with pytest.raises(CompileError) as e:
        fuse(run_passes(m, kv_len=5), max_seq=8)
    assert "odd_activation" in str(e.value) and "Softsign" in str(e.value) and "supported:" in str(e.value)
