"""Memory-mapped ONNX loading: the same model as onnx.load, with the large initializers as arrays over the file."""

import numpy as np
import onnx
import pytest
from kvoverlay.compiler.onnx_mmap import load_mapped
from kvoverlay.models.demo import build_llama_onnx
from onnx import numpy_helper
from test_cli import assert_one_line_error, kvo


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mm") / "m.onnx"
    build_llama_onnx(path)
    return path


def test_same_model_as_onnx_load(model_path):
    want = onnx.load(model_path)
    got, weights = load_mapped(model_path, 4096)
    assert weights, "the demo model has initializers above 4 KiB"
    inits = {t.name: numpy_helper.to_array(t) for t in want.graph.initializer}
    kept = {t.name for t in got.graph.initializer}
    assert kept | set(weights) == set(inits) and not kept & set(weights)
    for name, arr in weights.items():
        assert not arr.flags.writeable
        np.testing.assert_array_equal(arr, inits[name])
        assert inits[name].nbytes >= 4096
    for t in got.graph.initializer:
        assert numpy_helper.to_array(t).nbytes < 4096
    assert [n.name for n in got.graph.node] == [n.name for n in want.graph.node]
    assert got.opset_import == want.opset_import and got.graph.input == want.graph.input


def test_packed_and_unpacked_dims(model_path):
    """Whichever way dims are encoded, the mapped shapes agree with onnx's."""
    want = onnx.load(model_path)
    _, weights = load_mapped(model_path, 1)
    for t in want.graph.initializer:
        if t.name in weights:
            assert list(weights[t.name].shape) == list(t.dims)


@pytest.mark.parametrize("blob", [b"", b"\x0f\xff\xff", b"garbage that is not a protobuf at all"])
def test_not_an_onnx_file(tmp_path, blob):
    path = tmp_path / "bad.onnx"
    path.write_bytes(blob)
    assert_one_line_error(kvo("compile", path, "-o", tmp_path / "bad.kvo"), "bad.onnx")
    assert not (tmp_path / "bad.kvo").exists()
