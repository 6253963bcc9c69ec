"""Code generation: dependency tokens, register allocation, limits."""

import numpy as np
import pytest
from kvoverlay.compiler.codegen import fold_peaks, insert_tokens
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.frontend import CompileError
from kvoverlay.host.reference import ort_decode
from kvoverlay.host.session import Session, SessionError
from kvoverlay.models.demo import build_llama_onnx
from kvoverlay.sim.golden import GoldenModel

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS
from kvoverlay.timing import REQ_READ_LATENCY, req_cycles, unit_cycles

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


def test_table_rows_past_the_ldrow_buffer_are_a_clear_error():
    # the demo's embedding rows (64 int8 weights and 2 scales: 68 bytes, one 256-bit port word of 32 bytes more
    # than a 64-byte row buffer holds)
    with pytest.raises(CompileError, match=r"a int8 row of 64 elements takes 96 bytes, more than custom's LDROW row "
                                           r"buffer of 64 \(ldrow_row_bytes\)"):
        compile_model(build_llama_onnx(), PRESETS["ulx3s"].replace(name="custom", ldrow_row_bytes=64),
                      weights="int8", max_seq=8)


def test_group_size_is_validated():
    with pytest.raises(CompileError, match="group-size"):
        compile_model(build_llama_onnx(), "tiny", weights="int8", group_size=12, max_seq=8)
    # groups narrower than the GEMV engine is built for: refused by name, before quantization
    with pytest.raises(CompileError, match="--group-size 16: ulx3s's GEMV engine is built for groups of at least "
                                           "min_group=32"):
        compile_model(build_llama_onnx(), "ulx3s", weights="int4", group_size=16, max_seq=8)
    # a matrix whose columns (48) split only into narrower groups: refused at its GEMV, so placed on the host
    cfg = PRESETS["tiny"].replace(min_group=32)
    with pytest.raises(CompileError, match="groups of 16 weights, below min_group=32"):
        compile_model(build_llama_onnx(hidden=48), cfg, weights="int8", max_seq=8, host_ops=False)
    _, report = compile_model(build_llama_onnx(hidden=48), cfg, weights="int8", max_seq=8)
    assert any(op == "MatMul" and name.endswith("q_proj") for name, op in report["placement"]["host"])


def test_kv_pool_is_carved_by_columns():
    """4 layers of 5 KV heads of 16 exceed tiny's grid of 4 heads per layer but not its pool: the layers are
    packed side by side, recorded in the manifest, and the program follows its float64 reference."""
    cfg = PRESETS["tiny"]
    model = build_llama_onnx(layers=4, heads=5, kv_heads=5, head_dim=16, hidden=80)
    b, _ = compile_model(model, "tiny", weights="w16", max_seq=8)
    cols = 5 * cfg.kv_head_columns(16)
    kv = b.manifest["kv"]
    assert kv["pool_columns"] == cfg.kv_columns and kv["column_lanes"] == cfg.vector_lanes
    assert [kv["layers"][str(i)]["kv_base"] for i in range(4)] == [0, cols, 2 * cols, 3 * cols]
    assert all(kv["layers"][str(i)]["columns"] == cols for i in range(4))
    bases = sorted({i.fields["kv_base"] for i in b.instructions if i.op in ("KVAPPEND", "ATTN")})
    assert bases == [0, cols, 2 * cols, 3 * cols]
    tokens, ref = ort_decode(model, [5, 17, 42], 5)
    res = Session(b).generate([5, 17, 42], 5)
    assert res.tokens == tokens
    for g, r in zip(res.logits, ref, strict=True):
        assert g @ r / (np.linalg.norm(g) * np.linalg.norm(r)) >= 0.999


def test_layers_past_the_kv_pool_compile_for_the_offload_device():
    """A pool of 64 columns (tiny with one layer of 4 heads of 64); 5 layers of one KV head of 64 need 80: the
    first 4 are carved from the pool, the 5th gets a base past it, which the host runs on the offload device; the
    decode still follows onnxruntime."""
    from kvoverlay.host.backend import kv_layers, outside_kv_buffer

    cfg = PRESETS["tiny"].replace(max_layers=1)
    model = build_llama_onnx(layers=5, kv_heads=1, head_dim=64, heads=1, hidden=64)
    b, _ = compile_model(model, cfg, max_seq=8)
    bases = [b.manifest["kv"]["layers"][str(i)]["kv_base"] for i in range(5)]
    assert bases == [0, 16, 32, 48, 64] and b.manifest["kv"]["pool_columns"] == 64
    assert kv_layers(b, {i.fields["kv_base"] for i in outside_kv_buffer(b).values()}) == [4]
    tokens, _ = ort_decode(model, [5, 17, 42], 4)
    with Session(b, offload_device="cpu") as s:
        res = s.generate([5, 17, 42], 4)
        assert res.tokens == tokens
        assert s.backend.device_layers == [64]


def test_gpt2_of_five_heads_of_16_compiles_for_tiny():
    """Issue 12: 5 KV heads of 16 do not fit tiny's grid of 4 head slots of 64, but their 5 x 16 words do fit the
    pool; the program decodes onnxruntime's greedy tokens."""
    from kvoverlay.models.exported import CHECK_PROMPT, export_model

    path = export_model("gpt2", n_head=5, n_embd=80)
    b, _ = compile_model(str(path), "tiny", weights="w16", max_seq=16)
    assert {v["kv_heads"] for v in b.manifest["kv"]["layers"].values()} == {5}
    tokens, _ = ort_decode(str(path), list(CHECK_PROMPT), 8)
    with Session(b, offload_device="none") as s:
        assert s.generate(list(CHECK_PROMPT), 8).tokens == tokens


@pytest.mark.parametrize("preset", ["tiny", "ulx3s"])
def test_lm_head_of_49152_rows_is_tiled_and_token_exact(big_vocab_model, preset):
    """A head taller than the accumulator buffer compiles as tiles of at most half of it (GEMV, REQ, ARGMAXACC
    chained from the first tile, STORE of the tile's logits record), and the golden model follows onnxruntime."""
    cfg, prompt, new = PRESETS[preset], [5, 17, 42], 6
    b, _ = compile_model(str(big_vocab_model), preset, weights="int8", max_seq=len(prompt) + new)
    tiles = b.manifest["logits"]["tiles"]
    rows = [n for _, n in tiles]
    assert sum(rows) == b.manifest["logits"]["len"] == 49152 and max(rows) <= cfg.acc_buffer_words // 2
    chain = [i for i in b.instructions if i.op == "ARGMAXACC"]
    assert [(i.base, i.len, i.cont, i.rd) for i in chain] == [
        (sum(rows[:k]), n, int(k > 0), b.manifest["registers"]["next_token"]) for k, n in enumerate(rows)]
    assert not any(i.op == "ARGMAX" for i in b.instructions)
    stores = {i.addr: i.len for i in b.instructions if i.op == "STORE"}
    assert all(stores.get(a) == n for a, n in tiles)

    res = Session(b).generate(prompt, new)
    ref_tokens, ref_logits = ort_decode(str(big_vocab_model), prompt, new, forced=res.tokens)
    assert res.tokens == ref_tokens
    cos = [float(a @ r / np.linalg.norm(a) / np.linalg.norm(r)) for a, r in zip(res.logits, ref_logits, strict=True)]
    assert min(cos) > 0.999

    # without logits the head keeps its GEMVs and the ARGMAXACC chain: the same tokens, the tiles at the port rate
    bare, _ = compile_model(str(big_vocab_model), preset, weights="int8", max_seq=len(prompt) + new, logits=False)
    assert bare.manifest["logits"] == {"len": 49152, "tiles": []}
    head = bare.instructions[next(i for i, ins in enumerate(bare.instructions) if ins.op == "ARGMAXACC") - 1:]
    assert {i.op for i in head} == {"GEMV", "ARGMAXACC", "END"}
    s = Session(bare)
    fast = s.generate(prompt, new).result()
    assert fast.tokens == res.tokens and fast.logits == []
    gemv = sum(unit_cycles(cfg, i) for i in head if i.op == "GEMV")
    # the ARGMAXACCs (one cycle a row) hide under the GEMVs: the whole step is within 5% of the head's GEMVs alone
    assert gemv < fast.step_cycles[-1] < 1.05 * gemv < res.step_cycles[-1]
    with pytest.raises(SessionError, match="no-logits"):
        s.generate(prompt, 1, temperature=1.0)
    with pytest.raises(SessionError, match="no-logits"):
        s.teacher_forced(prompt, [1])


def test_no_logits_on_a_head_that_fits(tmp_path):
    """--no-logits tiles even a head the buffer holds, so no program needs the logits vector for its argmax."""
    onnx_path = tmp_path / "demo.onnx"
    build_llama_onnx(onnx_path)
    full, _ = compile_model(str(onnx_path), "tiny", weights="int8", max_seq=12)
    bare, _ = compile_model(str(onnx_path), "tiny", weights="int8", max_seq=12, logits=False)
    assert "tiles" not in full.manifest["logits"] and any(i.op == "ARGMAX" for i in full.instructions)
    assert not any(i.op in ("ARGMAX", "STORE") for i in bare.instructions)
    assert Session(bare).generate([5, 17, 42], 8).tokens == Session(full).generate([5, 17, 42], 8).tokens


def test_attn_above_max_q_heads_is_refused():
    """An ATTN of more query heads than the attention engine's output scratch holds (max_q_heads) is refused by name
    (without host ops; with them its attention is placed on the host); max_q_heads itself compiles. The demo's
    4 query heads over 2 KV heads run as 2 ATTNs of 2 (compiler.split_attention)."""
    compile_model(build_llama_onnx(), PRESETS["tiny"].replace(max_q_heads=2), weights="int8", max_seq=8)
    with pytest.raises(CompileError, match="2 query heads in one ATTN, above max_q_heads=1"):
        compile_model(build_llama_onnx(), PRESETS["tiny"].replace(max_q_heads=1), weights="int8", max_seq=8, host_ops=False)


def test_fold_peaks_marks_the_reqs_of_the_last_gemvs_range():
    """fold_peaks sets fold on a REQ exactly when the GEMV unit's record is its range (timing.peak_record): after
    the GEMV of those rows (split-K: the last one), not over another range, not once an ATTN wrote statistics into
    the range (one that writes them elsewhere, or none, leaves it), not before any GEMV; a REQ does not change the
    record, so two REQs of it both fold."""
    gemv = "GEMV addr=0x100 rows={rows} cols=32 fmt=int8 lg_group=2 sexp=0 x=0 x_e=E1 acc={acc} acc_e=E2 accumulate={k}"
    req = "REQ acc={acc} acc_e=E2 len={n} dst=64 dst_e=E3"
    code = isa.assemble("\n".join([
        req.format(acc=0, n=8),  # no GEMV yet
        gemv.format(rows=8, acc=0, k=0), gemv.format(rows=8, acc=0, k=1), req.format(acc=0, n=8),
        req.format(acc=0, n=8), req.format(acc=0, n=7), req.format(acc=4, n=4),
        gemv.format(rows=6, acc=16, k=0),
        "ATTN q=0 dst=128 kv_base=0 q_heads=1 kv_heads=1 head_dim=8 len_reg=R0 len_imm=1 stats=20",
        req.format(acc=16, n=6),
        gemv.format(rows=6, acc=32, k=0),
        "ATTN q=0 dst=128 kv_base=0 q_heads=1 kv_heads=1 head_dim=8 len_reg=R0 len_imm=1 stats=100",
        f"ATTN q=0 dst=128 kv_base=0 q_heads=1 kv_heads=1 head_dim=8 len_reg=R0 len_imm=1 stats={isa.ATTN_NO_STATS}",
        req.format(acc=32, n=6), "END"]))
    fold_peaks(code)
    assert [i.fields["fold"] for i in code if i.op == "REQ"] == [0, 1, 1, 0, 0, 0, 1]
    n = 8
    # the peak pass and its wait: a row of acc_lanes words per cycle from the start of a row, else a word per cycle
    assert req_cycles(CFG, n, fold=1) == req_cycles(CFG, n) - n // CFG.acc_lanes - REQ_READ_LATENCY
    assert req_cycles(CFG, n, fold=1, acc=1) == req_cycles(CFG, n, acc=1) - n - REQ_READ_LATENCY
