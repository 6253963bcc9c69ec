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
    assert list(BACKENDS) == ["isa", "rtl", "board", "gpu"]
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


def test_rtl_host_writes_and_reads_external_memory_between_steps(program):
    """The rtl backend's host port: a vector record written between steps (at any 4-byte alignment, sharing port
    words with its neighbours) reads back, the bytes around it keep their values, and steps still match isa."""
    pytest.importorskip("cocotb_tools")
    rtl, gold = RtlBackend(program), create_backend("isa", program)
    try:
        want = gold.step(5, 0)
        got = rtl.step(5, 0)
        np.testing.assert_array_equal(got.logits, want.logits)
        addr = -(-len(program.image) // 16) * 16 + 4
        before = rtl.read_vector(addr - 4, 2)
        rtl.write_vector(addr, [1, -2, 3], -7)
        m, e = rtl.read_vector(addr, 3)
        assert m.tolist() == [1, -2, 3] and e == -7
        np.testing.assert_array_equal(rtl.read_vector(addr - 4, 2)[0][:2], before[0][:2])
        np.testing.assert_array_equal(rtl.step(17, 1).logits, gold.step(17, 1).logits)
    finally:
        rtl.close()


def test_isa_is_the_hybrid_golden_model_and_gpu_follows_the_contract(program):
    from kvoverlay.host.offload import HybridGoldenBackend

    isa = create_backend("isa", program, offload_device="none", kv_sinks=2)
    assert type(isa) is HybridGoldenBackend and isinstance(isa, GoldenBackend) and not isa.hybrid
    pytest.importorskip("torch")
    gpu = create_backend("gpu", program, offload_device="cpu")
    assert isinstance(gpu, Backend)
    step = gpu.step(5, 0)
    out, nxt = program.manifest["logits"], program.manifest["registers"]["next_token"]
    assert gpu.read_register(nxt) == step.next_token == int(np.argmax(step.logits))
    m, e = gpu.read_vector(out["addr"], out["len"])  # the step's logits as a vector record
    want_m, want_e = nx.from_float(step.logits)
    assert e == want_e and np.array_equal(m, want_m)
    with pytest.raises(SessionError, match="only the next-token register"):
        gpu.read_register(0)
    with pytest.raises(SessionError, match="only the token and position registers"):
        gpu.step(5, 1, registers={3: 1})
    with pytest.raises(NotImplementedError, match="cannot write external memory"):
        gpu.write_vector(out["addr"], [1], 0)
