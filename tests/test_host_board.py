"""``--backend board`` through the simulated board: the demo decoder end to end over the UART bridge, bit-identical
to ``--backend isa`` (tokens and logits), its hardware counters equal to the Verilated overlay's."""

import json

import numpy as np
import pytest

pytest.importorskip("cocotb_tools")

from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.board import board_mem_bytes, board_memory
from kvoverlay.host.session import Session, SessionError
from kvoverlay.models.demo import build_llama_onnx
from test_cli import kvo

from kvoverlay import bundle as kvbundle

PROMPT = [5, 17, 42]
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def demo_program(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    build_llama_onnx(folder / "demo.onnx")
    program, _ = compile_model(str(folder / "demo.onnx"), "tiny", weights="int8", max_seq=len(PROMPT) + NEW_TOKENS + 2)
    kvbundle.save(program, folder / "demo-int8.kvo")
    return program, folder / "demo-int8.kvo"


def test_board_memory_fits_program(demo_program):
    program, _ = demo_program
    need = board_mem_bytes(program)
    assert need == 1 << (need - 1).bit_length() and need >= len(program.image)


def test_demo_on_simulated_board_bit_identical(demo_program):
    program, path = demo_program
    gold = Session(program, "isa").generate(PROMPT, NEW_TOKENS)
    with Session(program, "board", port="sim") as sess:
        res = sess.generate(PROMPT, NEW_TOKENS).result()
        stats = sess.backend.client.stats
    assert res.tokens == gold.tokens
    assert len(res.logits) == len(gold.logits) == NEW_TOKENS
    for a, b in zip(res.logits, gold.logits):
        assert np.array_equal(a, b)
    assert stats["retries"] == 0
    # the same through the command line; the board's block RAM keeps the simulation memory's timing, so its hardware
    # counters equal the Verilated overlay's (both 3 cycles/token above the golden model's replay, docs/benchmarks.md)
    out = json.loads(kvo("run", path, "--backend", "board", "--port", "sim", "--max-new-tokens", NEW_TOKENS,
                         "--json").stdout)
    rtl = json.loads(kvo("run", path, "--backend", "rtl", "--max-new-tokens", NEW_TOKENS, "--json").stdout)
    assert out["tokens"] == rtl["tokens"] == gold.tokens
    assert out["cycles_per_token"] == rtl["cycles_per_token"]


def test_board_needs_port(demo_program):
    program, path = demo_program
    with pytest.raises(SessionError, match="--backend board needs --port"):
        Session(program, "board")
    res = kvo("run", path, "--backend", "board", "--port", "/dev/kvo-no-such-port")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("kvoverlay: error: cannot open /dev/kvo-no-such-port") and res.stderr.count("\n") == 1


def test_demo_from_sdram_on_simulated_board(demo_program):
    """A program larger than the board's block RAM (here: a 64 KiB block RAM for the 128 KiB demo) runs from the
    SDRAM behind the controller, the checking SDRAM model on its pins, bit-identical to ``--backend isa``; the
    SDRAM's rate costs cycles."""
    program, _ = demo_program
    small = board_mem_bytes(program) // 2
    assert board_memory(program) == "bram" and board_memory(program, small) == "sdram"
    gold = Session(program, "isa").generate(PROMPT, NEW_TOKENS)
    with Session(program, "board", port="sim", bram_bytes=small) as sess:
        assert sess.backend.memory == "sdram"
        res = sess.generate(PROMPT, NEW_TOKENS).result()
    assert res.tokens == gold.tokens
    for a, b in zip(res.logits, gold.logits):
        assert np.array_equal(a, b)
    with Session(program, "board", port="sim") as sess:
        bram = sess.generate(PROMPT, NEW_TOKENS).result()
    assert bram.step_bytes_read == res.step_bytes_read
    assert all(s > b for s, b in zip(res.step_cycles, bram.step_cycles))


def test_micro_on_simulated_board_bit_identical(tmp_path):
    """The CI bitstream's design (the micro preset's board top) in its simulated twin runs micro's demo decoder
    bit-identically to ``--backend isa``."""
    from test_config import MICRO_DEMO

    model = build_llama_onnx(tmp_path / "micro.onnx", **MICRO_DEMO)
    program, _ = compile_model(model, "micro", weights="int8", max_seq=len(PROMPT) + NEW_TOKENS + 2, host_ops=False)
    gold = Session(program, "isa").generate(PROMPT, NEW_TOKENS)
    with Session(program, "board", port="sim") as sess:
        assert sess.backend.memory == "bram"
        res = sess.generate(PROMPT, NEW_TOKENS).result()
    assert res.tokens == gold.tokens
    for a, b in zip(res.logits, gold.logits, strict=True):
        assert np.array_equal(a, b)
