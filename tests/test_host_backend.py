"""The backend contract and table: what Session relies on, and the vector/register access the runtime uses to
exchange tensors with a program between steps."""

import numpy as np
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.backend import BACKENDS, Backend, GoldenBackend, RtlBackend, SessionError, create_backend
from kvoverlay.models.demo import build_llama_onnx

from kvoverlay import numerics as nx


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.onnx"
    build_llama_onnx(path)
    return compile_model(str(path), "tiny", weights="int8", max_seq=8)[0]


def test_table_names_every_backend_and_its_fix():
    assert list(BACKENDS)[:3] == ["isa", "rtl", "gpu"]
    assert "kvoverlay[torch]" in BACKENDS["gpu"].install
    with pytest.raises(SessionError, match="unknown backend 'fpga'"):
        create_backend("fpga", None)


def test_builtin_backends_follow_the_contract(program):
    assert isinstance(create_backend("isa", program), Backend)
    rtl = RtlBackend(program)  # the simulator starts on the first step, not here
    assert isinstance(rtl, Backend) and rtl.process is None


def test_golden_step_reset_and_vector_access(program):
    b = GoldenBackend(program)
    first = b.step(5, 0)
    assert first.next_token == int(np.argmax(first.logits)) == b.read_register(program.manifest["registers"]["next_token"])
    out = program.manifest["logits"]
    m, e = b.read_vector(out["addr"], out["len"])
    np.testing.assert_array_equal(nx.to_float(m, e), first.logits)
    b.write_vector(out["addr"], np.arange(out["len"]), -3)
    m2, e2 = b.read_vector(out["addr"], out["len"])
    assert e2 == -3 and m2.tolist() == list(range(out["len"]))
    b.step(17, 1)
    b.reset()
    again = b.step(5, 0)  # a fresh KV cache: the first step again, bit for bit
    np.testing.assert_array_equal(again.logits, first.logits)


def test_rtl_has_no_host_write_port(program):
    with pytest.raises(NotImplementedError, match="host write port"):
        RtlBackend(program).write_vector(0, [1], 0)
