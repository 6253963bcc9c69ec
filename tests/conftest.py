"""Session-wide fixtures: the exported models are built (or taken from the cache) once per test session."""

import pytest

#: optimum exports, and a decoder of ONNX's own Attention / RMSNormalization / RotaryEmbedding ops (opset 23)
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "onnx_ops")
#: optimum exports whose graphs need the general rules of issue 12: gains with an offset and scaled embeddings
#: (gemma), Slice of GEMV outputs and rotary on part of each head (phi3, stablelm, gpt_neox: its QKV is
#: interleaved per head), ReLU (opt), RMSNorm over each head of q and k (qwen3)
MORE_FAMILIES = ("gemma", "phi3", "opt", "stablelm", "gpt_neox", "qwen3")
#: optimum exports the overlay refuses for now (none)
REFUSED_FAMILIES = ()


@pytest.fixture(scope="session")
def exported_models(tmp_path_factory):
    """Family name -> path of its ``model.onnx`` (optimum exports are cached under ``.cache/models``)."""
    from kvoverlay.models import exported

    paths = {fam: exported.export_model(fam) for fam in FAMILIES + MORE_FAMILIES + REFUSED_FAMILIES if fam != "onnx_ops"}
    paths["onnx_ops"] = tmp_path_factory.mktemp("onnx_ops") / "model.onnx"
    exported.build_onnx_ops_decoder(paths["onnx_ops"])
    return paths


_COVERAGE = None


@pytest.fixture(scope="session", autouse=True)
def rtl_coverage():
    """Every RTL run of the session is binned (``sim/coverage.py``); the report closes the test run."""
    global _COVERAGE
    from kvoverlay.sim.coverage import Coverage, collecting

    _COVERAGE = Coverage()
    with collecting(_COVERAGE) as cov:
        yield cov


def pytest_terminal_summary(terminalreporter):
    if _COVERAGE is not None and _COVERAGE.runs:
        terminalreporter.write_sep("-", "RTL functional coverage")
        terminalreporter.write(_COVERAGE.report())


@pytest.fixture(scope="session")
def trained_small():
    """The trained checkpoint (SmolLM2-135M, ``models/trained.py``) cut to its first 2 layers: real weights,
    tokenizer and vocabulary, small enough for every test; the export is cached under ``.cache/models``."""
    from kvoverlay.models.trained import trained_model

    return trained_model(layers=2)


@pytest.fixture(scope="session")
def trained_full():
    """The whole trained checkpoint (30 layers), for the targets that need a model that writes English."""
    from kvoverlay.models.trained import trained_model

    return trained_model()


@pytest.fixture(scope="session")
def big_vocab_model():
    """A random-init Llama export with a real vocabulary (49,152 rows, as SmolLM2's) and one small layer: an LM head
    taller than every small preset's accumulator buffer (``.cache/models``)."""
    from kvoverlay.models import exported

    return exported.export_model("llama", vocab_size=49152, num_hidden_layers=1)
