"""Code generation: dependency tokens, register allocation, limits."""

import numpy as np
import pytest
from kvoverlay.compiler.codegen import insert_tokens
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.frontend import CompileError
from kvoverlay.models.demo import build_llama_onnx
from kvoverlay.sim.golden import GoldenModel

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS

CFG = PRESETS["tiny"]


def _image():
    m, e = nx.from_float(np.linspace(-1, 1, 16))
    return nx.pack_vector_record(m, e) * 4


def _run(text):
    code = isa.assemble(text)
    insert_tokens(code)
    GoldenModel(CFG, _image()).run(code)  # raises on a race or a token deadlock
    return code


def test_raw_hazard_load_to_compute_gets_one_token():
    code = _run("LOAD addr=0 len=16 dst=0 dst_e=E0\nLOAD addr=48 len=16 dst=16 dst_e=E1\n"
                "VADD a=0 a_e=E0 b=16 b_e=E1 dst=32 dst_e=E2 len=16\nEND")
    assert [sorted(i.deps) for i in code[:3]] == [[], ["push_next"], ["pop_prev"]]


def test_war_hazard_compute_then_load():
    code = _run("LOAD addr=0 len=16 dst=0 dst_e=E0\nVSCALE a=0 a_e=E0 dst=32 dst_e=E2 len=16 imm_m=3 imm_e=0\n"
                "LOAD addr=48 len=16 dst=0 dst_e=E0\nEND")
    assert "push_prev" in code[1].deps and "pop_next" in code[2].deps


def test_load_store_hazard_is_relayed_through_compute():
    """STORE reads what a LOAD wrote and no compute instruction orders them: a NOP relays the token."""
    code = _run("LOAD addr=0 len=16 dst=0 dst_e=E0\nSTORE src=0 src_e=E0 len=16 addr=0x100\nEND")
    assert [i.op for i in code] == ["LOAD", "NOP", "STORE", "END"]
    assert code[1].queue == "compute" and {"pop_prev", "push_next"} <= code[1].deps
    assert "pop_prev" in code[2].deps


def test_transitive_order_needs_no_extra_token():
    """The store waits for the VADD, which waited for the LOAD: the store is ordered after the load already."""
    code = _run("LOAD addr=0 len=16 dst=0 dst_e=E0\nVADD a=0 a_e=E0 b=0 b_e=E0 dst=32 dst_e=E1 len=16\n"
                "STORE src=0 src_e=E0 len=16 addr=0x100\nSTORE src=32 src_e=E1 len=16 addr=0x200\nEND")
    assert "NOP" not in [i.op for i in code]


def test_every_compiled_program_runs_race_free():
    b, _ = compile_model(build_llama_onnx(), "tiny", weights="int8", max_seq=8)
    model = GoldenModel(b.config, b.image)
    for pos in range(3):
        model.run(b.instructions, args=[pos + 1, pos])
    pops = sum(("pop_prev" in i.deps) + ("pop_next" in i.deps) for i in b.instructions)
    pushes = sum(("push_prev" in i.deps) + ("push_next" in i.deps) for i in b.instructions)
    assert pops == pushes > 0


def test_abuf_too_small_is_a_clear_error():
    with pytest.raises(CompileError, match="activation buffer"):
        compile_model(build_llama_onnx(), PRESETS["tiny"].replace(act_buffer_words=256), weights="int8", max_seq=8)


def test_group_size_is_validated():
    with pytest.raises(CompileError, match="group-size"):
        compile_model(build_llama_onnx(), "tiny", weights="int8", group_size=12, max_seq=8)
