"""Real-exporter models (optimum-onnx llama/qwen2/gpt2) and an ONNX-op decoder through the compiler frontend.

For each model the numpy interpreter of the folded IR must match onnxruntime on the original
model, and greedy decoding must produce varied tokens (so a broken KV path cannot pass by accident).
"""

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FAMILIES
from kvoverlay.compiler.interp import run_graph
from kvoverlay.compiler.passes import run_passes
from kvoverlay.models import exported
from kvoverlay.models.exported import (
    CHECK_PROMPT,
    CHECK_TOKENS,
    MIN_DISTINCT,
    build_onnx_ops_decoder,
    export_info,
    export_model,
    greedy_decode_ort,
)

from kvoverlay.config import PRESETS

KV = 5
#: Nodes of the shape/mask subgraphs that exporters emit; none may survive folding at a concrete kv_len.
SHAPE_OPS = {"Shape", "ConstantOfShape", "Range", "Equal", "LessOrEqual", "And", "Flatten", "Squeeze"}


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _kv_inputs(sess):
    return [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]


@pytest.fixture(scope="module")
def folded(exported_models, tmp_path_factory):
    out = {}
    for fam, path in exported_models.items():
        out[fam] = run_passes(path, tmp_path_factory.mktemp(f"dump_{fam}"), kv_len=KV)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_io_convention_and_tiny_fit(exported_models, family):
    model = onnx.load(str(exported_models[family]), load_external_data=False)
    tiny = PRESETS["tiny"]
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == (23 if family == "onnx_ops" else 18)
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    kv_in = [n for n in ins if n.startswith("past_key_values.")]
    layers = len(kv_in) // 2
    assert set(ins) - set(kv_in) == {"input_ids", "attention_mask", "position_ids"}  # GPT-2 lists them after the KV
    assert kv_in == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert outs == ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    sess = _session(exported_models[family])
    kv_heads, head_dim = _kv_inputs(sess)[0].shape[1], _kv_inputs(sess)[0].shape[3]
    assert kv_heads == {"llama": 2, "mistral": 4, "qwen2": 1, "gpt2": 4, "onnx_ops": 2}[family]
    assert layers <= tiny.max_layers and kv_heads <= tiny.max_kv_heads and head_dim <= tiny.max_head_dim


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_interp_matches_ort(exported_models, folded, family, capsys):
    g = folded[family]
    hist = collections.Counter(n.op for n in g.nodes)
    with capsys.disabled():
        print(f"\n{family} folded at kv_len={KV}: {len(g.nodes)} nodes: "
              + ", ".join(f"{op} {n}" for op, n in hist.most_common()))
    assert not set(hist) & SHAPE_OPS
    assert "attention_mask" not in g.inputs
    for name in g.outputs:
        assert all(isinstance(d, int) for d in g.values[name].shape), (name, g.values[name].shape)
    if family == "onnx_ops":
        assert {"Attention", "RMSNormalization", "RotaryEmbedding"} <= set(hist)

    _check_against_ort(g, exported_models[family], family, KV)


@pytest.mark.parametrize("family", FAMILIES)
def test_symbolic_past_interp_matches_ort(exported_models, family):
    """Without kv_len the past length stays the symbol P; the unfolded graph still runs at any length."""
    g = run_passes(exported_models[family])
    assert g.values["present.0.key"].shape[2] == "P+1"
    assert g.values["logits"].shape == (1, 1, g.values["logits"].shape[2])
    _check_against_ort(g, exported_models[family], family, 9)


def _check_against_ort(g, path, family, kv_len):
    sess = _session(path)
    # Past KV from a real prefill of kv_len tokens, then one decode step at position kv_len.
    names = [o.name for o in sess.get_outputs()]
    kv = _kv_inputs(sess)
    prompt = np.arange(3, 3 + 7 * kv_len, 7, dtype=np.int64)[None] % 256
    pre = dict(zip(names, sess.run(names, {
        "input_ids": prompt, "attention_mask": np.ones((1, kv_len), np.int64),
        "position_ids": np.arange(kv_len, dtype=np.int64)[None],
        **{i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in kv}}), strict=True))
    rng = np.random.default_rng(3)
    for past in ("prefill", "random"):
        feeds = {"input_ids": np.array([[77]], np.int64), "position_ids": np.array([[kv_len]], np.int64)}
        for i in kv:
            feeds[i.name] = (pre[i.name.replace("past_key_values.", "present.")] if past == "prefill"
                             else rng.standard_normal((1, i.shape[1], kv_len, i.shape[3])).astype(np.float32))
        want = dict(zip(names, sess.run(names, {**feeds, "attention_mask": np.ones((1, kv_len + 1), np.int64)}),
                        strict=True))
        got = run_graph(g, {**feeds, **({"attention_mask": np.ones((1, kv_len + 1), np.int64)}
                                        if "attention_mask" in g.inputs else {})})
        for n in names:
            assert got[n].shape == want[n].shape, n
            np.testing.assert_allclose(got[n], want[n], rtol=1e-4, atol=1e-4, err_msg=f"{family} {past} {n}")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_is_varied(exported_models, family):
    dec = greedy_decode_ort(exported_models[family], CHECK_PROMPT, CHECK_TOKENS)
    assert len(dec.tokens) == len(dec.logits) == CHECK_TOKENS
    assert dec.distinct >= MIN_DISTINCT, dec.tokens
    assert dec.min_margin == min(float(np.sort(lg)[-1] - np.sort(lg)[-2]) for lg in dec.logits)
    if family != "onnx_ops":
        info = export_info(exported_models[family])
        assert info["check_tokens"] == dec.tokens and info["distinct"] == dec.distinct


def test_family_configs(exported_models):
    cfg = {f: export_info(exported_models[f])["config"] for f in ("llama", "qwen2", "gpt2")}
    assert cfg["llama"]["num_attention_heads"] == 4 and cfg["llama"]["num_key_value_heads"] == 2
    assert cfg["qwen2"]["num_key_value_heads"] == 1 and cfg["qwen2"]["tie_word_embeddings"]
    assert cfg["gpt2"]["activation_function"] == "gelu_new"
    # The exporter folds the tied lm_head into a second, transposed copy of the embedding matrix.
    model = onnx.load(str(exported_models["qwen2"]))
    vocab, hidden = cfg["qwen2"]["vocab_size"], cfg["qwen2"]["hidden_size"]
    big = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if sorted(t.dims) == [hidden, vocab]}
    embed = big.pop("model.embed_tokens.weight")
    assert len(big) == 1 and np.array_equal(next(iter(big.values())), embed.T)
    # Qwen2's q/k/v projections carry biases, Llama's do not.
    bias_names = lambda p: [t.name for t in onnx.load(str(p)).graph.initializer if "proj.bias" in t.name]
    assert len(bias_names(exported_models["qwen2"])) == 3 * cfg["qwen2"]["num_hidden_layers"]
    assert bias_names(exported_models["llama"]) == []
    # Norm weights are perturbed away from HF's all-ones init, so dropping one changes the outputs.
    for fam, name in (("llama", "model.norm.weight"), ("gpt2", "transformer.ln_f.weight")):
        w = {t.name: t for t in onnx.load(str(exported_models[fam])).graph.initializer}[name]
        assert not np.allclose(onnx.numpy_helper.to_array(w), 1.0), fam


def test_cache_hit_and_key(exported_models, monkeypatch):
    path = exported_models["llama"]
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(exported, "_export_once", lambda *a: pytest.fail("cache miss"))
    assert export_model("llama") == path
    assert path.stat().st_mtime_ns == before
    info = json.loads((path.parent / "export.json").read_text())
    assert info["family"] == "llama" and info["file_bytes"] == path.stat().st_size
    assert exported._cache_key("llama", 0, {}) != exported._cache_key("llama", 0, {"num_hidden_layers": 1})
    assert exported._cache_key("llama", 0, {}) != exported._cache_key("llama", 1, {})
    assert path.parent.name.endswith(exported._cache_key("llama", 0, {}))


def test_export_is_reproducible(exported_models, tmp_path):
    path = exported_models["llama"]
    again = exported._export_once("llama", 0, {}, tmp_path, export_info(path)["weight_scale"])
    assert again.read_bytes() == path.read_bytes()


def test_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KVOVERLAY_CACHE", str(tmp_path))
    assert exported.cache_root() == tmp_path


def test_bad_arguments():
    with pytest.raises(ValueError, match="family='bert'"):
        export_model("bert")
    with pytest.raises(ValueError, match="num_layers=1"):
        export_model("llama", num_layers=1)
    with pytest.raises(ValueError, match="kv_heads=3"):
        build_onnx_ops_decoder(kv_heads=3)
