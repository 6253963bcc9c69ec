"""Functional coverage bins: what a compiled decoder exercises, and what the report says it missed."""

from kvoverlay.compiler.driver import compile_model
from kvoverlay.models.demo import build_llama_onnx
from kvoverlay.sim import coverage
from kvoverlay.sim.coverage import Coverage, active, collecting

from kvoverlay import isa
from kvoverlay.config import PRESETS


def test_compiled_decoder_bins():
    b, _ = compile_model(build_llama_onnx(), "tiny", weights="int4", max_seq=12)
    cov = Coverage()
    cov.record(b.instructions, b.config, kv_lengths=range(1, 12))
    hit = {k for k, n in cov.hits.items() if n}
    assert ("opcode", "GEMV int4") in hit and ("opcode", "ATTN -") in hit and ("opcode", "ACT silu") in hit
    assert ("opcode", "GEMV w16") not in hit  # the demo program is all int4
    assert ("edge", "ATTN GQA (q_heads > kv_heads)") in hit and ("edge", "ATTN several tiles") in hit
    assert ("edge", "KV at full capacity") not in hit
    report = cov.report()
    assert "GEMV w16" in report.split("not hit:")[1]
    assert report.startswith("functional coverage of 1 RTL runs")


def test_outcomes_and_partial_words():
    cov = Coverage()
    prog = isa.assemble("LOAD addr=0 len=20 dst=0 dst_e=E0\nEND")
    cov.record(prog, PRESETS["tiny"], outcome="pc 0: LOAD: KV position 64 outside capacity 64 (KV full)")
    cov.record(prog, PRESETS["tiny"], outcome="ok")
    assert cov.hits[("partial last word", "LOAD")] == 2
    assert cov.hits[("outcome", "fault: KV full or out of range")] == 1 and cov.hits[("outcome", "ok")] == 1


def test_collecting_is_scoped():
    cov = Coverage()
    before = active()  # the session's collector (tests/conftest.py)
    with collecting(cov) as c:
        assert active() is c
    assert active() is before


def test_nested_collector_counts_for_the_enclosing_one(monkeypatch):
    monkeypatch.setattr(coverage, "_active", None)  # keep this synthetic run out of the session's report
    outer, inner = Coverage(), Coverage()
    program = isa.assemble("LOAD addr=0x100 len=3 dst=0 dst_e=E1\nEND")
    with collecting(outer):
        with collecting(inner):
            active().record(program, PRESETS["tiny"])
        assert inner.runs == outer.runs == 1
        assert outer.hits[("partial last word", "LOAD")] == inner.hits[("partial last word", "LOAD")] == 1
