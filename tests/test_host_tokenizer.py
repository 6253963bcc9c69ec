"""Text in and out: the tokenizer in the bundle, ``compile --tokenizer``, ``run --text``, the Session's text API."""

import json

import pytest
from kvoverlay.host.session import Session, SessionError
from kvoverlay.host.tokenizer import TextStream, Tokenizer, TokenizerError, find_tokenizer
from kvoverlay.models.demo import build_llama_onnx
from test_cli import assert_one_line_error, kvo

from kvoverlay import bundle as kvbundle

DEMO_VOCAB = 64


def word_tokenizer(n: int, ids=None) -> str:
    """A tokenizer.json of *n* whitespace-separated words ``w0``.. (ids given by *ids*, default 0..n-1)."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    ids = range(n) if ids is None else ids
    tok = HfTokenizer(models.WordLevel({f"w{i}": i for i in ids}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return tok.to_str()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo decoder with a tokenizer.json of its 64 tokens beside it, compiled (the tokenizer found)."""
    d = tmp_path_factory.mktemp("text")
    build_llama_onnx(d / "model.onnx")
    (d / "tokenizer.json").write_text(word_tokenizer(DEMO_VOCAB))
    res = kvo("compile", d / "model.onnx", "-o", d / "text.kvo", "--max-seq", "24", "--json")
    assert res.returncode == 0, res.stderr
    return d, json.loads(res.stdout)


def test_compile_stores_the_tokenizer_beside_the_model(demo):
    d, report = demo
    assert report["tokenizer"] == str(d / "tokenizer.json")
    program = kvbundle.load(d / "text.kvo")
    assert program.tokenizer == (d / "tokenizer.json").read_bytes()
    assert report["program_bytes"] == (d / "text.kvo").stat().st_size


def test_bundle_without_tokenizer_keeps_its_bytes(demo, tmp_path):
    """A program without a tokenizer is byte for byte what it was before the section existed."""
    d, _ = demo
    program = kvbundle.load(d / "text.kvo")
    bare = kvbundle.Bundle(program.config, program.instructions, program.image, program.manifest)
    blob = kvbundle.to_bytes(bare)
    assert b"tokenizer" not in blob[:4096]
    assert kvbundle.from_bytes(blob).tokenizer is None
    assert kvbundle.from_bytes(kvbundle.to_bytes(program)).tokenizer == program.tokenizer


def test_run_text_matches_run_prompt(demo):
    """--text w5 w17 w42 is --prompt 5,17,42; stdout holds the continuation as text, the figures go to stderr."""
    d, _ = demo
    ids = kvo("run", d / "text.kvo", "--prompt", "5,17,42", "--max-new-tokens", "6", "--json")
    assert ids.returncode == 0, ids.stderr
    tokens = json.loads(ids.stdout)["tokens"]
    res = kvo("run", d / "text.kvo", "--text", "w5 w17 w42", "--max-new-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert res.stdout == " ".join(f"w{t}" for t in tokens) + "\n"
    assert f"tokens: {','.join(map(str, tokens))}" in res.stderr
    js = json.loads(kvo("run", d / "text.kvo", "--text", "w5 w17 w42", "--max-new-tokens", "6", "--json").stdout)
    assert js["tokens"] == tokens and js["prompt_tokens"] == 3
    assert js["text"] == " ".join(f"w{t}" for t in tokens)


def test_session_text_api_streams(demo):
    d, _ = demo
    with Session(d / "text.kvo") as s:
        prompt = s.encode("w5 w17 w42")
        assert prompt == [5, 17, 42]
        gen = s.generate(prompt, 5)
        pieces = list(gen.text_stream())
        assert len(pieces) == 5  # one piece per token, each as it decodes
        assert "".join(pieces) == gen.text == s.decode(gen.tokens)


def test_text_stream_holds_back_partial_characters():
    """Byte-level BPE splits a character over tokens: nothing is emitted until its bytes are whole."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    bpe = HfTokenizer(models.BPE({"a": 0, "Ã": 1, "©": 2, "Ġ": 3}, []))  # byte-level symbols of "a", "é" (C3 A9), " "
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    stream = TextStream(Tokenizer(bpe.to_str().encode(), 4))
    assert [stream.push(t) for t in (0, 1, 2, 3, 0)] == ["a", "", "é", " ", "a"]
    assert stream.flush() == ""


def test_run_text_without_tokenizer_is_one_line(tmp_path):
    build_llama_onnx(tmp_path / "model.onnx")
    assert kvo("compile", tmp_path / "model.onnx", "-o", tmp_path / "bare.kvo", "--max-seq", "8").returncode == 0
    assert kvbundle.load(tmp_path / "bare.kvo").tokenizer is None
    assert_one_line_error(kvo("run", tmp_path / "bare.kvo", "--text", "w1 w2"), "no tokenizer")


def test_compile_refuses_a_tokenizer_of_another_vocabulary(demo, tmp_path):
    d, _ = demo
    (tmp_path / "big.json").write_text(word_tokenizer(DEMO_VOCAB * 2))
    out = tmp_path / "x.kvo"
    assert_one_line_error(kvo("compile", d / "model.onnx", "-o", out, "--tokenizer", tmp_path / "big.json"),
                          "128 tokens", "vocabulary of 64")
    assert not out.exists()
    (tmp_path / "bad.json").write_text("{not json")
    assert_one_line_error(kvo("compile", d / "model.onnx", "-o", out, "--tokenizer", tmp_path / "bad.json"),
                          "bad.json", "tokenizer.json")
    assert_one_line_error(kvo("compile", d / "model.onnx", "-o", out, "--tokenizer", tmp_path / "none.json"),
                          "--tokenizer", "no such file")
    assert not out.exists()


def test_text_outside_the_vocabulary_is_refused_before_decoding(demo, tmp_path):
    """A tokenizer whose ids go past the program's vocabulary: the text that reaches them is one line."""
    d, _ = demo
    program = kvbundle.load(d / "text.kvo")
    program.tokenizer = word_tokenizer(0, ids=[*range(62), 70, 71]).encode()  # 64 words, two ids beyond 63
    kvbundle.save(program, tmp_path / "sparse.kvo")
    assert kvo("run", tmp_path / "sparse.kvo", "--text", "w5 w61", "--max-new-tokens", "2").returncode == 0
    assert_one_line_error(kvo("run", tmp_path / "sparse.kvo", "--text", "w5 w70"), "id 70", "[0, 64)")
    with Session(tmp_path / "sparse.kvo") as s, pytest.raises(TokenizerError, match="id 71"):
        s.encode("w71")


def test_text_and_prompt_together_are_refused(demo):
    d, _ = demo
    assert_one_line_error(kvo("run", d / "text.kvo", "--text", "w1", "--prompt", "1"), "--text and --prompt")


def test_find_tokenizer(tmp_path):
    assert find_tokenizer(tmp_path / "model.onnx") is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer(tmp_path / "model.onnx") == tmp_path / "tokenizer.json"
    assert find_tokenizer(tmp_path / "model.onnx", tmp_path) == tmp_path / "tokenizer.json"
    with pytest.raises(TokenizerError, match="no such file"):
        find_tokenizer(tmp_path / "model.onnx", tmp_path / "missing.json")


def test_session_without_tokenizer(tmp_path):
    build_llama_onnx(tmp_path / "model.onnx")
    from kvoverlay.compiler.driver import compile_model

    program, _ = compile_model(str(tmp_path / "model.onnx"), "tiny", max_seq=8)
    with Session(program) as s, pytest.raises(SessionError, match="no tokenizer"):
        s.encode("w1")
