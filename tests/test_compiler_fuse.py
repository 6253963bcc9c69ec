"""Fusion: what each exported graph becomes, and that the fused program computes what onnxruntime does."""

import numpy as np
import pytest
from conftest import FAMILIES, MORE_FAMILIES
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


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
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


def test_gemma_folds_gain_offsets_and_embedding_scale(exported_models):
    og = fuse(run_passes(str(exported_models["gemma"]), kv_len=5), max_seq=32)
    assert {op.attrs["kind"] for op in og.ops if op.kind == "norm"} == {"rms"}
    assert not any(op.kind in ("scale", "mulc") for op in og.ops)  # sqrt(hidden) is in the table
    gains = [og.consts[op.attrs["gain"]] for op in og.ops if op.kind == "norm"]
    assert all(np.mean(g) > 0.5 for g in gains)  # 1 + w with w ~ 0, not w
    assert {op.attrs["func"] for op in og.ops if op.kind == "act"} == {"gelu_tanh"}


def test_constants_folded_from_the_past_length_are_position_tables(exported_models):
    """Gemma's export has no position_ids: its rotary angles come from the past KV's length, which folding
    pins to the trace length. Such constants are recomputed at every past length (= position)."""
    from kvoverlay.compiler.fuse import Fuser

    graph = run_passes(str(exported_models["gemma"]), kv_len=5)
    assert "position_ids" not in graph.inputs
    fz = Fuser(graph, max_seq=12)
    angles = [v for v, val in graph.values.items() if fz.position_const(v) and val.const.size == 16]
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    theta = np.outer(np.arange(12), np.concatenate([inv_freq, inv_freq]))
    got = {}
    for v in angles:
        name = fz.vector(v)
        kind, rows = fz.out.tables[next(op for op in fz.out.ops if op.out == name).attrs["table"]]
        assert kind == "position" and np.allclose(fz.ix.const(v).reshape(-1), rows[5])  # folded at position 5
        for label, fn in (("cos", np.cos), ("sin", np.sin)):
            if np.allclose(rows, fn(theta), atol=1e-6):
                got[label] = v
    assert sorted(got) == ["cos", "sin"]


def test_phi3_slices_gemvs_and_rotates_part_of_each_head(exported_models):
    og = fuse(run_passes(str(exported_models["phi3"]), kv_len=5), max_seq=32)
    layers = len(og.kv)
    # q, k, v sliced from qkv_proj; gate, up sliced from gate_up_proj; o and down; then the LM head
    assert sum(op.kind == "linear" for op in og.ops) == 7 * layers + 1
    ropes = [op for op in og.ops if op.kind == "rope"]
    assert len(ropes) == 2 * layers and all(op.attrs["head_dim"] == 16 for op in ropes)
    # half a head per row: 4 rotated pairs, then 4 kept pairs (cos 1, sin 0)
    rows = [t for kind, t in og.tables.values() if kind == "position"]
    assert len(rows) == 2 and all(t.shape[1] == 8 for t in rows)
    assert any(np.array_equal(t[:, 4:], np.ones((32, 4))) for t in rows)
    assert any(np.array_equal(t[:, 4:], np.zeros((32, 4))) for t in rows)


def test_qwen3_norms_each_head_of_q_and_k(exported_models):
    """Qwen3's q/k RMSNorms normalize each head alone: one NORM over each head, the gain repeated per head; an
    overlay whose vector lanes do not divide the heads gets a NORM per head instead (rows)."""
    og = fuse(run_passes(str(exported_models["qwen3"]), kv_len=5), max_seq=32)
    per_head = [op for op in og.ops if op.kind == "norm" and op.attrs.get("head_dim")]
    assert len(per_head) == 2 * len(og.kv) and all(op.attrs["head_dim"] == 16 for op in per_head)
    # the q norm's gain (one per head element) is repeated over the 4 query heads
    gain = og.consts[per_head[0].attrs["gain"]]
    assert gain.size == 64 and np.array_equal(gain, np.tile(gain[:16], 4))
    rows = fuse(run_passes(str(exported_models["qwen3"]), kv_len=5), max_seq=32, lanes=64)
    norms = [op for op in rows.ops if op.kind == "norm"]
    assert not any(op.attrs.get("head_dim") for op in norms)
    # per layer: two whole-vector norms, 4 q heads and 2 k heads; the final norm
    assert len(norms) == (2 + 4 + 2) * len(rows.kv) + 1
    # a vector unit built without NORM over each head (config.norm_heads, ulx3s): the same rows
    unbuilt = fuse(run_passes(str(exported_models["qwen3"]), kv_len=5), max_seq=32, norm_heads=False)
    assert [(op.kind, op.attrs.get("head_dim")) for op in unbuilt.ops] == [(op.kind, op.attrs.get("head_dim"))
                                                                          for op in rows.ops]


def test_opt_relu_is_exact_act(exported_models):
    og = fuse(run_passes(str(exported_models["opt"]), kv_len=5), max_seq=32)
    acts = [i for i, op in enumerate(og.ops) if op.kind == "act"]
    assert acts and all(og.ops[i].attrs["func"] == "relu" for i in acts)
    # scaled up by 2**20 before the step table and back after: both exact
    assert all(og.ops[i - 1].kind == og.ops[i + 1].kind == "scale" for i in acts)
    assert all(og.ops[i - 1].attrs["factor"] * og.ops[i + 1].attrs["factor"] == 1.0 for i in acts)


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
