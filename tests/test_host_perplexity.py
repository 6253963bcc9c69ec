"""``kvoverlay perplexity``: teacher-forced mean NLL of a text file, against onnxruntime on the same tokens."""

import json
import math

import numpy as np
import pytest
from kvoverlay.host.perplexity import chunks, nll, perplexity
from kvoverlay.host.session import SessionError
from test_cli import assert_one_line_error, kvo
from test_host_tokenizer import demo  # noqa: F401 - the demo decoder with its word tokenizer, compiled


def test_nll_is_the_log_softmax():
    logits = np.array([1.0, 2.0, 3.0, -1.0])
    p = np.exp(logits) / np.exp(logits).sum()
    for t in range(4):
        assert nll(logits, t) == pytest.approx(-math.log(p[t]), rel=1e-12)
    assert nll(np.array([1000.0, 0.0]), 0) == pytest.approx(0.0, abs=1e-12)  # no overflow


def test_chunks():
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]  # a last chunk of one token scores nothing
    assert chunks(list(range(8)), 3)[-1] == [6, 7]
    with pytest.raises(SessionError, match="scores nothing"):
        chunks([1, 2, 3], 1)


def test_perplexity_json_against_onnxruntime(demo, tmp_path):  # noqa: F811
    """w16 on the golden model: the NLL of 60 tokens in chunks of 24 within 0.5% of fp32 onnxruntime's."""
    d, _ = demo
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{t}" for t in rng.integers(0, 64, 60)))
    res = kvo("perplexity", d / "text.kvo", "--text-file", text, "--check", d / "model.onnx", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"nll", "perplexity", "tokens"} <= set(out)
    assert out["chunk"] == 24 and out["tokens"] == 23 + 23 + 11  # chunks of 24, 24 and 12 tokens
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"]))
    assert abs(out["nll_rel_diff"]) < 0.005
    assert out["reference"]["nll"] == pytest.approx(out["nll"], rel=0.005)
    plain = kvo("perplexity", d / "text.kvo", "--text-file", text, "--max-tokens", "30", "--chunk", "10")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("perplexity ") and "over 27 tokens (chunks of 10" in plain.stdout


def test_perplexity_api_agrees_with_the_command(demo):  # noqa: F811
    d, _ = demo
    ids = [5, 17, 42, 7, 9, 11, 13]
    a = perplexity(d / "text.kvo", ids)
    b = perplexity(d / "text.kvo", ids, chunk=4)
    assert a["tokens"] == 6 and b["tokens"] == 3 + 2
    assert a["nll"] > 0 and b["nll"] > 0


def test_perplexity_bad_input_is_one_line(demo, tmp_path):  # noqa: F811
    d, _ = demo
    text = tmp_path / "t.txt"
    text.write_text("w1")
    assert_one_line_error(kvo("perplexity", d / "text.kvo", "--text-file", text), "fewer than 2 tokens")
    text.write_text("w1 w2 w3")
    assert_one_line_error(kvo("perplexity", d / "text.kvo", "--text-file", text, "--chunk", "1"), "--chunk 1")
    assert_one_line_error(kvo("perplexity", d / "text.kvo", "--text-file", tmp_path / "missing.txt"), "missing.txt")


# ---------------------------------------------------------------- targets on trained weights (issue 12)
TARGET_TOKENS = 12
#: The paragraph's first tokens scored for the NLL target (the golden model runs the 30 layers in numpy).
TARGET_TEXT_TOKENS = 48


@pytest.fixture(scope="module")
def trained_programs(trained_full):
    """The whole trained checkpoint compiled in w16 and int8 for u280 (its 49,152-row head needs u280's buffers)."""
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.host.tokenizer import Tokenizer

    programs = {}
    for weights in ("w16", "int8"):
        program, _ = compile_model(str(trained_full), "u280", weights=weights, max_seq=96)
        program.tokenizer = (trained_full.parent / "tokenizer.json").read_bytes()
        programs[weights] = program
    return programs, Tokenizer(programs["w16"].tokenizer, 49152)


@pytest.mark.parametrize("weights", ["w16", "int8"])
def test_trained_greedy_is_token_exact_with_onnxruntime(trained_full, trained_programs, weights):
    from kvoverlay.host.reference import ort_decode
    from kvoverlay.host.session import Session
    from kvoverlay.models.trained import ENGLISH_PROMPT

    programs, tok = trained_programs
    prompt = tok.encode(ENGLISH_PROMPT)
    want, _ = ort_decode(str(trained_full), prompt, TARGET_TOKENS)
    with Session(programs[weights]) as s:
        gen = s.generate(prompt, TARGET_TOKENS)
        assert gen.tokens == want, (gen.text, tok.decode(want))
        assert "Berlin" in gen.text


def test_trained_int8_nll_within_one_percent(trained_full, trained_programs):
    from kvoverlay.host.perplexity import ort_perplexity
    from kvoverlay.models.trained import ENGLISH_TEXT

    programs, tok = trained_programs
    ids = tok.encode(ENGLISH_TEXT)[:TARGET_TEXT_TOKENS]
    ref = ort_perplexity(str(trained_full), ids, 96)
    got = perplexity(programs["int8"], ids)
    print(f"int8 NLL {got['nll']:.5f}, fp32 onnxruntime {ref['nll']:.5f} over {got['tokens']} tokens")
    assert got["tokens"] == ref["tokens"] == len(ids) - 1
    assert ref["perplexity"] < 60  # a trained model on English, not a random one (49,152 tokens)
    assert abs(got["nll"] / ref["nll"] - 1) < 0.01
