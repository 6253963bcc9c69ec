"""Demo Llama-style ONNX decoder: structure, KV-cache I/O and mask, greedy decoding."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kvoverlay.models.demo import build_llama_onnx, greedy_decode_ort

PROMPT = [5, 17, 42]


@pytest.fixture(scope="module")
def model():
    return build_llama_onnx()


@pytest.fixture(scope="module")
def sess(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_model_structure(model, tmp_path):
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18
    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert dims(ins["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(ins["position_ids"]) == ["batch_size", "sequence_length"]
    assert dims(ins["attention_mask"])[0] == "batch_size"
    for n in ("input_ids", "attention_mask", "position_ids"):
        assert ins[n].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(outs["logits"]) == ["batch_size", "sequence_length", 64]
    for layer in range(2):
        for kind in ("key", "value"):
            assert dims(ins[f"past_key_values.{layer}.{kind}"]) == ["batch_size", 2, "past_sequence_length", 16]
            assert dims(outs[f"present.{layer}.{kind}"]) == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    ops = {n.op_type for n in model.graph.node}
    for op in ("Gather", "Pow", "ReduceMean", "Sqrt", "Div", "MatMul", "Slice", "Neg", "Concat", "Expand",
               "Softmax", "Sigmoid", "Where"):
        assert op in ops, op
    # projections are [in, out] initializers
    inits = {i.name: i for i in model.graph.initializer}
    assert list(inits["model.layers.0.self_attn.q_proj.weight"].dims) == [64, 64]
    assert list(inits["model.layers.0.self_attn.k_proj.weight"].dims) == [64, 32]
    assert list(inits["lm_head.weight"].dims) == [64, 64]
    # deterministic and saveable
    path = tmp_path / "m.onnx"
    again = build_llama_onnx(path)
    assert again.SerializeToString() == model.SerializeToString()
    assert onnx.load(path).SerializeToString() == model.SerializeToString()
    assert build_llama_onnx(seed=1).SerializeToString() != model.SerializeToString()


def run(sess, ids, pos0, past):
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    seq = ids.shape[1]
    feed = {"input_ids": ids, "attention_mask": np.ones((1, pos0 + seq), np.int64),
            "position_ids": np.arange(pos0, pos0 + seq, dtype=np.int64).reshape(1, -1), **past}
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(names, feed), strict=True))
    new_past = {k.replace("present.", "past_key_values."): v for k, v in res.items() if k.startswith("present.")}
    return res["logits"], new_past


def empty_past():
    return {f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for k in ("key", "value")}


def test_prefill_equals_token_by_token(sess):
    tokens = [5, 17, 42, 3, 60, 9, 33]
    full, full_past = run(sess, tokens, 0, empty_past())
    assert full.shape == (1, len(tokens), 64)
    past, steps = empty_past(), []
    for i, t in enumerate(tokens):
        lg, past = run(sess, [t], i, past)
        steps.append(lg[0, 0])
    np.testing.assert_allclose(full[0], np.stack(steps), rtol=1e-4, atol=1e-4)
    for k in past:
        assert past[k].shape == (1, 2, len(tokens), 16)
        np.testing.assert_allclose(full_past[k], past[k], rtol=1e-4, atol=1e-4)
    # chunked prefill (seq > 1 with a non-empty past) exercises the causal mask offset
    lg_a, past_a = run(sess, tokens[:3], 0, empty_past())
    lg_b, _ = run(sess, tokens[3:], 3, past_a)
    np.testing.assert_allclose(np.concatenate([lg_a[0], lg_b[0]]), full[0], rtol=1e-4, atol=1e-4)


def test_attention_mask_masks_keys(sess):
    """A zero in attention_mask hides that key: padding token content must not matter."""
    def logits_with(pad_token):
        ids = np.array([[pad_token, 5, 17, 42]], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.array([[0, 1, 1, 1]], np.int64),
                "position_ids": np.array([[0, 0, 1, 2]], np.int64), **empty_past()}
        return sess.run(["logits"], feed)[0][0, -1]
    np.testing.assert_allclose(logits_with(1), logits_with(50), rtol=1e-5, atol=1e-5)
    unpadded, _ = run(sess, PROMPT, 0, empty_past())
    np.testing.assert_allclose(logits_with(1), unpadded[0, -1], rtol=1e-4, atol=1e-4)


def test_greedy_decode_varied(model):
    tokens, logits = greedy_decode_ort(model, PROMPT, 16)
    assert len(tokens) == len(logits) == 16
    assert all(int(np.argmax(lg)) == t for t, lg in zip(tokens, logits, strict=True))
    margins = [float(np.diff(np.sort(lg)[-2:])[0]) for lg in logits]
    msg = f"tokens={tokens} min top1-top2 margin={min(margins):.4f}"
    assert len(set(tokens)) >= 6, msg
    assert min(margins) > 0, msg
    again, _ = greedy_decode_ort(model, PROMPT, 16)
    assert again == tokens
