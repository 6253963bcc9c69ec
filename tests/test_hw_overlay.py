"""The overlay (hw/overlay.py) under Verilator via the RTL backend (sim/rtl.py, cocotb module sim/rtl_cocotb.py).

Programs of LOAD / GEMV (int4, int8, w16, split-K) / REQ / STORE / STACC / NOP with dependency tokens run on the
Verilated overlay and on the golden model; the final activation buffer, accumulators, exponent registers and
the bytes written to external memory must be identical, and each queue's busy cycles must equal the sum of the
units' cycle formulas. Faults: illegal instructions stop with the right pc and reason, a token deadlock trips
the watchdog naming the stalled unit, opcodes without a unit report "unimplemented". One Verilator build
(cached under .cache/rtl) serves every case.
"""

import numpy as np
import pytest

pytest.importorskip("amaranth")
pytest.importorskip("cocotb_tools")

from kvoverlay.hw.overlay import QUEUE_DEPTH
from kvoverlay.sim.coverage import Coverage
from kvoverlay.sim.golden import ExecError, GoldenModel
from kvoverlay.sim.rtl import WATCHDOG_CYCLES, RtlError, RtlModel, build_model

from kvoverlay import isa, timing
from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS
from kvoverlay.timing import held_ports, lock_conflicts
from kvoverlay.timing import unit_cycles as hw_unit_cycles

CFG = PRESETS["tiny"]
QRANGE = {"int4": (-8, 8), "int8": (-128, 128), "w16": (-32768, 32768), "uint4": (0, 16)}


@pytest.fixture(scope="module")
def model_dir():
    return build_model(CFG)


def unit_cycles(ins):
    return hw_unit_cycles(CFG, ins)


def make_case(fmt, seed, rows=24, cols=64, lg_group=2):
    """A LOAD -> GEMV (two split-K halves) -> REQ -> STORE/STACC program with random data, and its image."""
    rng = np.random.default_rng(seed)
    pb = CFG.port_bytes
    group = isa.GROUP_BASE << lg_group
    image = bytearray(1 << 16)
    x = rng.integers(-nx.MANT_MAX, nx.MANT_MAX + 1, 2 * cols)
    rec = nx.pack_vector_record(x, -15)
    image[0x100:0x100 + len(rec)] = rec
    lo, hi = QRANGE[fmt]
    bases = (0x1000, 0x5000)
    for base in bases:
        q = rng.integers(lo, hi, (rows, cols))
        sm = rng.integers(1, 1 << 16, (rows, cols // group))
        blob = nx.pack_rows(q, sm, fmt, group, pb)
        image[base:base + len(blob)] = blob
    n_out = rows - 3  # a partial last buffer word and a record whose exponent shares a beat with mantissas
    text = f"""
        LOAD addr=0x100 len={2 * cols} dst=0 dst_e=E1 push_next
        GEMV addr={bases[0]:#x} rows={rows} cols={cols} fmt={fmt} lg_group={lg_group} sexp=-5 x=0 x_e=E1 acc=16 acc_e=E2 pop_prev
        GEMV addr={bases[1]:#x} rows={rows} cols={cols} fmt={fmt} lg_group={lg_group} sexp=-5 x={cols} x_e=E1 acc=16 acc_e=E2 accumulate=1
        REQ acc=16 acc_e=E2 len={n_out} dst=256 dst_e=E7 push_next
        NOP queue=store pop_prev push_prev
        NOP queue=compute pop_next push_next
        STORE src=256 src_e=E7 len={n_out} addr=0x9000 pop_prev
        STACC acc=16 len={rows} addr=0xA000
        END
    """
    return isa.assemble(text), bytes(image)


def run_both(program, image, args=None):
    gold = GoldenModel(CFG, image)
    gold_counters = gold.run(program, args)
    rtl = RtlModel(CFG, image)
    counters = rtl.run(program, args)
    return gold, gold_counters, rtl, counters


@pytest.mark.parametrize("fmt", ["int4", "int8", "w16", "uint4"])
def test_program_bit_exact(model_dir, fmt):
    program, image = make_case(fmt, seed={"int4": 1, "int8": 2, "w16": 3, "uint4": 4}[fmt])
    gold, gold_counters, rtl, counters = run_both(program, image)
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs
    assert gold.eregs[7] != nx.EXP_MIN  # the REQ result is not trivially zero
    extent = len(rtl.dram)
    assert extent == len(image) > 0xA000 + 8 * 24
    assert rtl.dram.tobytes() == gold.dram[:extent].tobytes()
    assert counters.instructions == gold_counters.instructions == len(program)
    assert rtl.last_run.hw_counters["bytes_written"] == sum(gold_counters.bytes_written.values())
    for q in isa.QUEUES:
        expected = sum(unit_cycles(i) for i in program if i.op != "END" and i.queue == q)
        assert counters.busy[q] == expected, q
    print(f"{fmt}: rtl {counters.cycles} cycles (busy {counters.busy}), golden model predicts {gold_counters.cycles} "
          f"(busy {gold_counters.busy}); {rtl.last_run.sim_cycles_per_s:.0f} simulated cycles/s")


def test_group_and_word_alignment_variants(model_dir):
    """Group 8 at int8 (8 scale bytes: weights start on a word boundary) and group 64 at int4, one run."""
    rng = np.random.default_rng(7)
    pb = CFG.port_bytes
    image = bytearray(1 << 16)
    x = rng.integers(-nx.MANT_MAX, nx.MANT_MAX + 1, 128)
    rec = nx.pack_vector_record(x, 3)
    image[0x100:0x100 + len(rec)] = rec
    q = rng.integers(-128, 128, (5, 128))
    sm = rng.integers(1, 1 << 16, (5, 16))
    image[0x1000:0x1000 + 5 * nx.row_stride(128, "int8", 8, pb)] = nx.pack_rows(q, sm, "int8", 8, pb)
    q4 = rng.integers(-8, 8, (9, 128))
    sm4 = rng.integers(1, 1 << 16, (9, 2))
    image[0x3000:0x3000 + 9 * nx.row_stride(128, "int4", 64, pb)] = nx.pack_rows(q4, sm4, "int4", 64, pb)
    program = isa.assemble("""
        LOAD addr=0x100 len=128 dst=32 dst_e=E4 push_next
        GEMV addr=0x1000 rows=5 cols=128 fmt=int8 lg_group=0 sexp=2 x=32 x_e=E4 acc=0 acc_e=E9 pop_prev
        GEMV addr=0x3000 rows=9 cols=128 fmt=int4 lg_group=3 sexp=-60 x=32 x_e=E4 acc=5 acc_e=E10
        REQ acc=0 acc_e=E9 len=5 dst=512 dst_e=E11
        REQ acc=5 acc_e=E10 len=9 dst=528 dst_e=E12 push_next
        STORE src=512 src_e=E11 len=5 addr=0x8000 pop_prev
        STORE src=528 src_e=E12 len=9 addr=0x8010
        END
    """)
    gold, _, rtl, counters = run_both(program, bytes(image))
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs
    assert rtl.dram.tobytes() == gold.dram[:len(rtl.dram)].tobytes()
    for q in isa.QUEUES:
        assert counters.busy[q] == sum(unit_cycles(i) for i in program if i.op != "END" and i.queue == q), q


def test_ldrow_gathers_and_dequantizes_rows(model_dir):
    """LDROW of rows picked by a register argument, in every format (int4 with groups of 8), then STORE."""
    rng = np.random.default_rng(31)
    pb = CFG.port_bytes
    image = bytearray(1 << 16)
    lines, bases = [], {"int4": 0x1000, "int8": 0x3000, "w16": 0x6000}
    for i, (fmt, (cols, group)) in enumerate({"int4": (48, 8), "int8": (96, 32), "w16": (40, 8)}.items()):
        lo, hi = QRANGE[fmt]
        q = rng.integers(lo, hi, (12, cols))
        sm = rng.integers(1, 1 << 16, (12, cols // group))
        blob = nx.pack_rows(q, sm, fmt, group, pb)
        image[bases[fmt]:bases[fmt] + len(blob)] = blob
        dst = 128 * (i + 1)
        lines.append(f"LDROW addr={bases[fmt]:#x} row_reg=R2 row_imm={i - 1} cols={cols} fmt={fmt} "
                     f"lg_group={group.bit_length() - 4} sexp={-20 + 7 * i} dst={dst} dst_e=E{3 + i}")
        lines.append("NOP queue=load push_next")
        lines.append("NOP queue=compute pop_prev push_next")
        lines.append(f"STORE src={dst} src_e=E{3 + i} len={cols} addr={0x9000 + 0x100 * i:#x} pop_prev")
    lines.append("END")
    program = isa.assemble("\n".join(lines))
    gold, _, rtl, counters = run_both(program, bytes(image), args=[0, 0, 7])
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert rtl.eregs == gold.eregs
    assert rtl.dram.tobytes() == gold.dram[:len(rtl.dram)].tobytes()
    hw = rtl.last_run.hw_counters
    # each STORE overlaps the next LDROW, whose request then waits for the port (counted as port stall)
    assert hw["stall_port_load"] > 0
    for q in isa.QUEUES:
        expected = sum(unit_cycles(i) for i in program if i.op != "END" and i.queue == q)
        assert counters.busy[q] - hw[f"stall_port_{q}"] == expected, q


ILLEGAL = {
    "reserved opcode": 5,
    "reserved bits": isa.encode(isa.Instr("NOP", {"queue": 1})) | (1 << 100),
    "reserved enum": isa.encode(isa.Instr("NOP", {"queue": 1})) + ((3 - 1) << isa.BY_NAME["NOP"].offsets["queue"]),
    "reserved flag": isa.encode(isa.Instr("LOAD", {"addr": 0x100, "len": 4})) | (1 << isa.OPCODE_BITS),  # pop_prev on a load
}


@pytest.mark.parametrize("reason", list(ILLEGAL))
def test_illegal_instruction_reports_pc(model_dir, reason):
    ok = isa.encode_program(isa.assemble("NOP queue=compute\nNOP queue=load\nNOP queue=store"))
    blob = ok + ILLEGAL[reason].to_bytes(isa.INSN_BYTES, "little") + isa.encode_program([isa.Instr("END")])
    with pytest.raises(isa.IsaError):
        isa.decode_program(blob)  # the reference decoder rejects the same word
    with pytest.raises(RtlError) as info:
        RtlModel(CFG, bytes(256)).run(blob)
    assert info.value.pc == 3
    assert info.value.code == "illegal"
    assert reason in str(info.value)


def test_token_deadlock_trips_watchdog_naming_unit(model_dir):
    # the compute queue waits for a token that the load queue never pushes
    program = isa.assemble("""
        LOAD addr=0x100 len=8 dst=0 dst_e=E1
        NOP queue=compute pop_prev
        END
    """)
    with pytest.raises(RtlError) as info:
        RtlModel(CFG, bytes(1024)).run(program, watchdog=500)
    assert info.value.code == "watchdog"
    assert info.value.unit == "compute"
    assert info.value.pc == 1
    assert "compute" in str(info.value) and "stalled" in str(info.value)



def test_token_deadlock_behind_a_full_queue_trips_watchdog(model_dir):
    """More instructions behind the stalled one than its queue holds: the front end then waits to dispatch, which is no
    progress (it once was, and such a deadlock ran to the host's cycle limit)."""
    program = isa.assemble("\n".join(["LOAD addr=0x100 len=8 dst=0 dst_e=E1", "NOP queue=compute pop_prev",
                                      *["NOP queue=compute"] * (QUEUE_DEPTH + 2), "END"]))
    with pytest.raises(RtlError) as info:
        RtlModel(CFG, bytes(1024)).run(program, watchdog=500, max_cycles=20_000)
    assert (info.value.code, info.value.unit, info.value.pc) == ("watchdog", "compute", 1)


def test_attention_alone_longer_than_the_watchdog(model_dir):
    """An ATTN with nothing else in flight (a hybrid segment's last: the STORE of its output waits for it) computes
    from the KV buffer for longer than the default watchdog without a port beat; that work is progress, not a stall
    (issue 9: tiny's 4 heads of 64 over 64 tokens tripped the watchdog)."""
    qh, kvh, d, length = 4, 2, 64, CFG.kv_capacity
    attn = isa.Instr("ATTN", {"q": 0, "q_e": 1, "dst": 512, "dst_e": 4, "kv_base": 0, "q_heads": qh, "kv_heads": kvh,
                              "head_dim": d, "len_reg": 0, "len_imm": length, "stats": 100})
    assert hw_unit_cycles(CFG, attn, length) > WATCHDOG_CYCLES
    rng = np.random.default_rng(9)
    img = _Image(1 << 16)
    lines = [f"LOAD addr={img.put(nx.pack_vector_record(rng.integers(-30000, 30000, n), exp)):#x} len={n} dst={dst} "
             f"dst_e=E{e}" for n, dst, e, exp in ((qh * d, 0, 1, -13), (kvh * d, 256, 2, -12), (kvh * d, 384, 3, -11))]
    lines[-1] += " push_next"
    # the store queue runs KVAPPEND and ATTN: the loads reach it through the compute queue
    lines += ["NOP queue=compute pop_prev push_next",
              f"KVAPPEND k=256 k_e=E2 v=384 v_e=E3 kv_base=0 heads={kvh} head_dim={d} pos_reg=R0 pos_imm=0 pop_prev",
              isa.format_instr(attn),
              f"STORE src=512 src_e=E4 len={qh * d} addr=0x8000", f"STACC acc=100 len={2 * qh} addr=0x8400",
              "END"]
    program = isa.assemble("\n".join(lines))
    gold, _, rtl, counters = run_both(program, bytes(img.data))
    assert rtl.dram.tobytes() == gold.dram[:len(rtl.dram)].tobytes()
    assert rtl.eregs == gold.eregs
    assert counters.busy["store"] >= sum(hw_unit_cycles(CFG, i, length) for i in program if i.op in ("KVAPPEND", "ATTN"))

@pytest.mark.parametrize("stats", [isa.ATTN_NO_STATS, 300])
def test_attention_runs_beside_the_weight_stream(model_dir, stats):
    """The store queue's KVAPPEND and ATTN run while the compute queue streams an unrelated GEMV (which reads its
    input through an activation-buffer port of its own): the run takes fewer cycles than its queues' busy cycles
    together, exactly the golden model's replay, bit-exact. An ATTN that writes statistics holds the accumulators'
    write port, which the GEMV writes too (elsewhere): then the two wait for each other (timing.LOCK_FIELDS), as the
    model's lock stalls say, and the run is longer by what the overlap hid."""
    qh, kvh, d, length = 4, 2, 16, CFG.kv_capacity
    rng = np.random.default_rng(31)
    img = _Image(1 << 16)
    lines = [f"LOAD addr={img.put(nx.pack_vector_record(rng.integers(-30000, 30000, n), exp)):#x} len={n} dst={dst} "
             f"dst_e=E{e}" for n, dst, e, exp in ((qh * d, 0, 1, -13), (kvh * d, 256, 2, -12), (kvh * d, 384, 3, -11),
                                                  (128, 1024, 5, -14))]
    lines[-1] += " push_next"
    rows = 256
    waddr = img.put(nx.pack_rows(rng.integers(-8, 8, (rows, 128)), rng.integers(1, 1 << 16, (rows, 4)), "int4", 32,
                                 CFG.port_bytes))
    lines += ["NOP queue=compute pop_prev push_next",
              f"KVAPPEND k=256 k_e=E2 v=384 v_e=E3 kv_base=0 heads={kvh} head_dim={d} pos_reg=R0 pos_imm=0 pop_prev",
              (f"ATTN q=0 q_e=E1 dst=512 dst_e=E4 kv_base=0 q_heads={qh} kv_heads={kvh} head_dim={d} len_reg=R0 "
               f"len_imm=1 stats={stats}"),
              f"GEMV addr={waddr:#x} rows={rows} cols=128 fmt=int4 lg_group=2 sexp=-9 x=1024 x_e=E5 acc=0 acc_e=E6",
              "END"]
    program = isa.assemble("\n".join(lines))
    gold, gold_counters, rtl, counters = run_both(program, bytes(img.data), args=[length - 1])
    assert np.array_equal(rtl.abuf, gold.abuf) and np.array_equal(rtl.acc, gold.acc) and rtl.eregs == gold.eregs
    hw = rtl.last_run.hw_counters
    assert counters.cycles == gold_counters.cycles
    assert {q: hw[f"stall_lock_{q}"] for q in isa.QUEUES} == gold_counters.stall_lock
    attn, gemv = (timing.instr_cycles(i, CFG, length) for i in program if i.op in ("ATTN", "GEMV"))
    assert min(attn, gemv) > 1000  # both long: what overlaps is not the dispatch
    if stats == isa.ATTN_NO_STATS:
        assert counters.cycles < counters.busy["compute"] + counters.busy["store"] - min(attn, gemv) // 2
        assert sum(gold_counters.stall_lock.values()) == 0
    else:  # one waits for the other's end
        assert counters.cycles > attn + gemv
        assert sum(gold_counters.stall_lock.values()) > min(attn, gemv) - 100


@pytest.mark.parametrize("text, pc, fault", [
    ("NOP queue=compute\nVADD a=3 b=0 dst=0 len=4\nEND", 1, "unaligned"),
    ("ARGMAX x=0 len=0 rd=R1\nEND", 0, "shape"),
    ("ATTN q=0 dst=0 kv_base=0 q_heads=2 kv_heads=1 head_dim=8 len_reg=R0 len_imm=0 stats=0\nEND", 0, "kv range"),
    ("KVAPPEND k=0 v=64 kv_base=0 heads=1 head_dim=8 pos_reg=R0 pos_imm=-1\nEND", 0, "kv range"),
    ("NOP queue=load\nLDROW addr=0 row_reg=R0 row_imm=0 cols=32 fmt=uint4 lg_group=2 sexp=0 dst=0 dst_e=E1\nEND", 1, "format"),
], ids=["vector-unaligned", "argmax-empty", "attn-empty", "kvappend-negative", "ldrow-uint4"])
def test_vector_and_attention_faults_report_pc(model_dir, text, pc, fault):
    """The vector unit's, attention engine's and LDROW's faults reach the overlay's error status with the pc."""
    program = isa.assemble(text)
    if fault != "unaligned":  # the ISA allows unaligned starts (the compiler never emits them); the RTL refuses
        with pytest.raises(ExecError):
            GoldenModel(CFG, bytes(256)).run(program)  # the golden model rejects the same instruction
    with pytest.raises(RtlError) as info:
        RtlModel(CFG, bytes(256)).run(program)
    assert info.value.pc == pc
    assert info.value.code == "exec"
    assert fault in str(info.value)


def test_execution_fault_unaligned_vector(model_dir):
    program = isa.assemble("LOAD addr=0x100 len=4 dst=3 dst_e=E1\nEND")
    with pytest.raises(RtlError) as info:
        RtlModel(CFG, bytes(1024)).run(program)
    assert info.value.pc == 0
    assert info.value.code == "exec"
    assert "unaligned" in str(info.value)


def random_program(rng, cfg):
    """A random, race-free program: LOADs, GEMV tiles (random format, group, split-K), REQ, STORE, STACC, NOPs.

    Every hand-off between queues is ordered by dependency tokens, so the program-order golden model and the
    decoupled hardware must agree.
    """
    pb = cfg.port_bytes
    lanes = 2 * pb
    image = bytearray(1 << 17)
    lines = []
    cols = int(rng.choice([64, 128, 192]))
    x = rng.integers(-nx.MANT_MAX, nx.MANT_MAX + 1, cols)
    rec = nx.pack_vector_record(x, int(rng.integers(-40, 10)))
    image[0x200:0x200 + len(rec)] = rec
    lines.append(f"LOAD addr=0x200 len={cols} dst=0 dst_e=E1 push_next")
    base, acc_e, out_addr = 0x1000, 2, 0x18000
    for t in range(int(rng.integers(2, 4))):
        fmt = str(rng.choice(["int4", "int8", "w16"]))
        narrowest = max(cfg.min_group, pb * 8 // nx.WEIGHT_FORMATS[fmt])
        group = int(rng.choice([g for g in (8, 16, 32, 64) if g >= narrowest and cols % g == 0]))
        rows = int(rng.integers(1, 40))
        lo, hi = QRANGE[fmt]
        sexp = int(rng.integers(-30, 5))
        acc = int(rng.integers(0, 64))
        parts = int(rng.integers(1, 3))
        for k in range(parts):
            q = rng.integers(lo, hi, (rows, cols))
            sm = rng.integers(1, 1 << 16, (rows, cols // group))
            blob = nx.pack_rows(q, sm, fmt, group, pb)
            image[base:base + len(blob)] = blob
            flags = " pop_prev" if t == 0 and k == 0 else ""
            flags += " pop_next" if t > 0 and k == 0 else ""
            lines.append(f"GEMV addr={base:#x} rows={rows} cols={cols} fmt={fmt} lg_group={group.bit_length() - 4} "
                         f"sexp={sexp} x=0 x_e=E1 acc={acc} acc_e=E{acc_e} accumulate={int(k > 0)}{flags}")
            base += -(-len(blob) // 256) * 256
        n = int(rng.integers(1, rows + 1))
        dst = lanes * int(rng.integers(16, 64))
        lines.append(f"REQ acc={acc} acc_e=E{acc_e} len={n} dst={dst} dst_e=E{acc_e + 10} push_next")
        lines.append(f"STORE src={dst} src_e=E{acc_e + 10} len={n} addr={out_addr:#x} pop_prev")
        lines.append(f"STACC acc={acc} len={rows} addr={out_addr + 0x800:#x} push_prev")
        if rng.integers(2):
            lines.append("NOP queue=store")
        out_addr += 0x1000
        acc_e += 1
    lines.append("NOP queue=compute pop_next")
    lines.append("END")
    return isa.assemble("\n".join(lines)), bytes(image)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_programs_match_golden(model_dir, seed):
    program, image = random_program(np.random.default_rng(seed), CFG)
    gold, gold_counters, rtl, counters = run_both(program, image)
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs
    assert rtl.dram.tobytes() == gold.dram[:len(rtl.dram)].tobytes()
    assert counters.instructions == gold_counters.instructions
    for q in isa.QUEUES:
        assert counters.busy[q] == sum(unit_cycles(i) for i in program if i.op != "END" and i.queue == q), q


@pytest.mark.parametrize("fmt", ["int8", "w16"])
def test_gemv_edges_at_the_top_of_the_buffer(model_dir, fmt):
    """The coverage bins no other overlay run hits: a GEMV whose last x word is partial (``cols`` not a multiple of
    the buffer word), a one-row GEMV, and vectors that end at the top of the activation buffer (x, and the REQ
    results that then overwrite part of it)."""
    rng = np.random.default_rng({"int8": 5, "w16": 6}[fmt])
    pb, lanes, top = CFG.port_bytes, CFG.abuf_lanes, CFG.act_buffer_words
    cols, group = 40, 8  # the smallest group that holds one engine window of either format
    assert cols % lanes and cols % group == 0
    x_dst = top - 3 * lanes
    image = bytearray(1 << 16)
    rec = nx.pack_vector_record(rng.integers(-nx.MANT_MAX, nx.MANT_MAX + 1, cols), -9)
    image[0x100:0x100 + len(rec)] = rec
    lo, hi = QRANGE[fmt]
    for base, rows in ((0x1000, 1), (0x3000, 7)):
        blob = nx.pack_rows(rng.integers(lo, hi, (rows, cols)), rng.integers(1, 1 << 16, (rows, cols // group)),
                            fmt, group, pb)
        image[base:base + len(blob)] = blob
    program = isa.assemble(f"""
        LOAD addr=0x100 len={cols} dst={x_dst} dst_e=E1 push_next
        GEMV addr=0x1000 rows=1 cols={cols} fmt={fmt} lg_group=0 sexp=-4 x={x_dst} x_e=E1 acc=0 acc_e=E2 pop_prev
        GEMV addr=0x3000 rows=7 cols={cols} fmt={fmt} lg_group=0 sexp=-4 x={x_dst} x_e=E1 acc=1 acc_e=E3
        REQ acc=0 acc_e=E2 len=1 dst={top - lanes} dst_e=E4
        REQ acc=1 acc_e=E3 len=7 dst={top - 2 * lanes} dst_e=E5 push_next
        STORE src={top - lanes} src_e=E4 len=1 addr=0x8000 pop_prev
        STORE src={top - 2 * lanes} src_e=E5 len=7 addr=0x8100
        STACC acc=0 len=8 addr=0x8200
        END
    """)
    cov = Coverage()
    cov.record(program, CFG)
    assert cov.hits[("partial last word", "GEMV")] and cov.hits[("edge", "GEMV one row")]
    assert cov.hits[("edge", "vector at the top of the buffer")]
    gold, gold_counters, rtl, counters = run_both(program, bytes(image))
    assert gold.eregs[4] != nx.EXP_MIN and gold.eregs[5] != nx.EXP_MIN
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs
    assert rtl.dram.tobytes() == gold.dram[:len(rtl.dram)].tobytes()
    assert counters.instructions == gold_counters.instructions == len(program)
    for q in isa.QUEUES:
        assert counters.busy[q] == sum(unit_cycles(i) for i in program if i.op != "END" and i.queue == q), q


def test_wide_port_preset_ulx3s():
    """The 256-bit port of ulx3s: 128-bit instructions sliced out of port words, 4 accumulators per STACC beat."""
    cfg = PRESETS["ulx3s"]
    build_model(cfg)
    program, image = random_program(np.random.default_rng(21), cfg)
    gold = GoldenModel(cfg, image)
    gold.run(program)
    rtl = RtlModel(cfg, image)
    rtl.run(program)
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs
    assert rtl.dram.tobytes() == gold.dram[:len(rtl.dram)].tobytes()


@pytest.mark.parametrize("text, fault, message", [
    ("GEMV addr=0x1000 rows=2 cols=64 fmt=int4 lg_group=1 sexp=0 x=0 x_e=E1 acc=0 acc_e=E2 accumulate=0",
     "GEMV: execution fault: group", "min_group=32"),
    ("NORM x=0 x_e=E1 g=64 g_e=E2 dst=128 dst_e=E3 len=32 eps_m=5000 eps_e=-40 kind=rms head_dim=16",
     "NORM: execution fault: shape", "built without it"),
    # a w16 row of 8,192 weights in groups of 32: 16,896 bytes, one port word more than the row buffer's 16 KiB
    ("LDROW addr=0 row_reg=R0 row_imm=0 cols=8192 fmt=w16 lg_group=2 sexp=0 dst=0 dst_e=E1",
     "LDROW: execution fault: out of range", "exceeds LDROW's row buffer of 16384"),
], ids=["gemv-group-16", "norm-heads", "ldrow-row-16k"])
def test_unbuilt_options_fault_on_ulx3s(text, fault, message):
    """ulx3s is built for groups of min_group=32 or more, without NORM over each head (norm_heads) and with a
    16 KiB LDROW row buffer (ldrow_row_bytes): a GEMV of groups of 16 faults GROUP on the RTL at its pc, a NORM over
    heads SHAPE, a longer LDROW row OUT_OF_RANGE, and the golden model refuses each from the same config."""
    cfg = PRESETS["ulx3s"]
    assert not cfg.builds_group(16) and cfg.builds_group(32) and not cfg.norm_heads
    assert cfg.ldrow_buffer_bytes == 16384
    build_model(cfg)
    program = isa.assemble(f"NOP queue=compute\n{text}\nEND")
    with pytest.raises(ExecError, match=message):
        GoldenModel(cfg, bytes(1 << 14)).run(program)
    with pytest.raises(RtlError) as info:
        RtlModel(cfg, bytes(1 << 14)).run(program)
    assert info.value.pc == 1
    assert info.value.code == "exec"
    assert fault in str(info.value)


class _Image:
    """External-memory image under construction: vector records and weight tiles at 256-byte steps."""

    def __init__(self, size=1 << 17):
        self.data = bytearray(size)
        self.next = 0x200

    def put(self, blob):
        addr = self.next
        self.data[addr:addr + len(blob)] = blob
        self.next += -(-len(blob) // 256) * 256
        return addr


def random_full_program(rng, cfg):
    """A random, race-free program over every opcode of the ISA, and its image.

    LOADs (and an LDROW) fill the activation buffer; the store queue appends tokens to the KV buffer (KVAPPEND
    through a position register) and attends over them (ATTN, GQA) while the compute queue runs GEMV/REQ, every
    vector op (VADD, VMUL,
    VSCALE, ACT in each function, NORM in each kind, ROPE in each mode, ARGMAX), partly on each other's results;
    STORE/STACC write results out, and ARGMAXACC chains an argmax over the GEMV's accumulators and the attention
    statistics. A relay NOP orders load -> store, a token the attention's output back to the compute queue, and
    one compute -> store the stores, so program order
    (the golden model) and the decoupled hardware must agree.
    """
    lanes = 2 * cfg.port_bytes
    img = _Image()
    lines, stores = [], []
    words = iter(range(0, cfg.act_buffer_words // lanes, 1))
    eregs = iter(range(1, isa.NUM_EREGS))

    def alloc(n):
        first = next(words)
        for _ in range(-(-n // lanes) - 1):
            next(words)
        return first * lanes

    def load(n, lo=-12, hi=-8, top=nx.MANT_MAX, ereg=None):
        """A LOAD of a random record; *ereg* = (register, exponent) shares a register among equal exponents."""
        m = rng.integers(-top, top + 1, n)
        addr = alloc(n)
        e, exp = ereg if ereg else (next(eregs), int(rng.integers(lo, hi)))
        lines.append(f"LOAD addr={img.put(nx.pack_vector_record(m, exp)):#x} len={n} dst={addr} dst_e=E{e}")
        return addr, e

    def out(n):
        return alloc(n), next(eregs)

    # KV: a layer at a random pool column, heads, tokens
    kvh = int(rng.choice([1, 2]))
    qh = kvh * int(rng.choice([1, 2]))
    d = int(rng.choice([8, 12, 16]))
    kv_base = int(rng.integers(0, cfg.kv_columns - kvh * cfg.kv_head_columns(d) + 1))
    ntok = int(rng.integers(2, 2 * cfg.attn_tile + 3))
    pos_base = int(rng.integers(0, 3))
    # tokens cycle through three K and three V exponent registers (32 registers would not cover each token)
    k_regs = [(next(eregs), int(rng.integers(-14, -9))) for _ in range(3)]
    v_regs = [(next(eregs), int(rng.integers(-16, -7))) for _ in range(3)]
    kv = [(load(kvh * d, ereg=k_regs[t % 3], top=int(rng.choice([1 << 6, 1 << 12, nx.MANT_MAX]))),
           load(kvh * d, ereg=v_regs[t % 3])) for t in range(ntok)]
    q, q_e = load(qh * d, -14, -11)
    n = int(rng.integers(5, 70))
    a, a_e = load(n)
    b, b_e = load(n)
    g, g_e = load(n, -16, -13)
    rope_h = int(rng.integers(1, 3))
    x, x_e = load(rope_h * d)
    cs, cs_e = load(d // 2, -16, -15)
    sn, sn_e = load(d // 2, -16, -15)
    # a GEMV input and its weights (int8), and an LDROW from the same matrix
    cols, rows = 64, int(rng.integers(3, 20))
    gx, gx_e = load(cols)
    qw = rng.integers(-128, 128, (rows, cols))
    sm = rng.integers(1, 1 << 16, (rows, cols // 32))
    waddr = img.put(nx.pack_rows(qw, sm, "int8", 32, cfg.port_bytes))
    row, row_e = out(cols)
    lines.append(f"LDROW addr={waddr:#x} row_reg=R3 row_imm={int(rng.integers(0, rows)) - 1} cols={cols} fmt=int8 "
                 f"lg_group=2 sexp=-20 dst={row} dst_e=E{row_e}")
    lines[-1] += " push_next"
    lines.append("NOP queue=compute pop_prev push_next")  # the loads, relayed to the store queue's KVAPPENDs
    first = True

    def comp(text):
        nonlocal first
        lines.append(text + (" pop_prev" if first else ""))
        first = False

    for t, ((k, k_e), (v, v_e)) in enumerate(kv):
        comp(f"KVAPPEND k={k} k_e=E{k_e} v={v} v_e=E{v_e} kv_base={kv_base} heads={kvh} head_dim={d} pos_reg=R1 "
             f"pos_imm={t - pos_base}")
    att, att_e = out(qh * d)
    comp(f"ATTN q={q} q_e=E{q_e} dst={att} dst_e=E{att_e} kv_base={kv_base} q_heads={qh} kv_heads={kvh} head_dim={d} "
         f"len_reg=R2 len_imm={ntok - 2 * pos_base} stats=100 push_prev")
    comp(f"GEMV addr={waddr:#x} rows={rows} cols={cols} fmt=int8 lg_group=2 sexp=-20 x={gx} x_e=E{gx_e} acc=10 "
         f"acc_e=E{next(eregs)} accumulate=0")
    ge = int(lines[-1].split("acc_e=E")[1].split()[0])
    gy, gy_e = out(rows)
    comp(f"REQ acc=10 acc_e=E{ge} len={rows} dst={gy} dst_e=E{gy_e}")
    s_, s_e = out(n)
    comp(f"VADD a={a} a_e=E{a_e} b={b} b_e=E{b_e} dst={s_} dst_e=E{s_e} len={n}")
    p_, p_e = out(n)
    comp(f"VMUL a={s_} a_e=E{s_e} b={b} b_e=E{b_e} dst={p_} dst_e=E{p_e} len={n}")
    comp(f"VSCALE a={p_} a_e=E{p_e} dst={p_} dst_e=E{p_e} len={n} imm_m={int(rng.integers(-30000, 30000))} "
         f"imm_e={int(rng.integers(-20, -10))}")
    acts = []
    for func in isa.ENUMS["func"]:
        o, o_e = out(n)
        comp(f"ACT x={a} x_e=E{a_e} dst={o} dst_e=E{o_e} len={n} func={func}")
        acts.append((o, o_e))
    norms = []
    for kind in isa.ENUMS["norm"]:
        o, o_e = out(n)
        comp(f"NORM x={s_} x_e=E{s_e} g={g} g_e=E{g_e} dst={o} dst_e=E{o_e} len={n} eps_m=1 eps_e=-20 kind={kind}")
        norms.append((o, o_e))
    ropes = []
    for mode in isa.ENUMS["rope"]:
        o, o_e = out(rope_h * d)
        comp(f"ROPE x={x} x_e=E{x_e} cos={cs} cos_e=E{cs_e} sin={sn} sin_e=E{sn_e} dst={o} dst_e=E{o_e} heads={rope_h} "
             f"head_dim={d} mode={mode}")
        ropes.append((o, o_e))
    comp(f"ARGMAX x={norms[0][0]} len={n} rd=R5")
    comp(f"ARGMAX x={att} len={qh * d} rd=R6 pop_next")
    lines[-1] += " push_next"
    stores = [(att, att_e, qh * d), (gy, gy_e, rows), (p_, p_e, n), (row, row_e, cols), *[(o, e, n) for o, e in acts],
              *[(o, e, n) for o, e in norms], *[(o, e, rope_h * d) for o, e in ropes]]
    out_addr = 0x18000
    for i, (src, e, length) in enumerate(stores):
        lines.append(f"STORE src={src} src_e=E{e} len={length} addr={out_addr:#x}" + (" pop_prev" if i == 0 else ""))
        out_addr += 0x200
    lines.append(f"STACC acc=100 len={2 * qh} addr={out_addr:#x}")
    # an argmax chained over two "tiles": the GEMV's accumulators, then the attention statistics
    lines.append(f"ARGMAXACC acc=10 len={rows} base=0 rd=R7 cont=0")
    lines.append(f"ARGMAXACC acc=100 len={2 * qh} base={rows} rd=R7 cont=1")
    lines.append("END")
    args = [0, pos_base, 2 * pos_base, 1]
    return isa.assemble("\n".join(lines)), bytes(img.data), args


@pytest.mark.parametrize("seed", [41, 42, 43])
def test_random_programs_over_every_opcode_match_golden(model_dir, seed):
    program, image, args = random_full_program(np.random.default_rng(seed), CFG)
    assert {i.op for i in program} == {o.name for o in isa.OPCODES}
    gold, gold_counters, rtl, counters = run_both(program, image, args)
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs
    assert rtl.regs == gold.regs
    assert rtl.dram.tobytes() == gold.dram[:len(rtl.dram)].tobytes()
    assert counters.instructions == gold_counters.instructions == len(program)
    kv_len = {pc: ins.fields["len_imm"] + args[ins.fields["len_reg"]] for pc, ins in enumerate(program) if ins.op == "ATTN"}
    for q in isa.QUEUES:  # each unit's busy-cycle formula, ATTN and KVAPPEND and the vector ops included
        expected = sum(hw_unit_cycles(CFG, ins, kv_len.get(pc, 0)) for pc, ins in enumerate(program)
                       if ins.op != "END" and ins.queue == q)
        assert counters.busy[q] == expected, q
    print(f"seed {seed}: rtl {counters.cycles} cycles, golden model predicts {gold_counters.cycles}")


@pytest.mark.parametrize("qh, kvh, d, length, holes", [(4, 4, 16, 2, [0]), (1, 1, 4, 3, [0]), (2, 1, 8, 19, [0, 9, 17])],
                         ids=["mha-first", "one-head", "tiles"])
def test_attention_over_unwritten_positions(model_dir, qh, kvh, d, length, holes):
    """Positions never appended keep exponent EXP_MIN: the tile's largest value exponent must come from the
    positions of the score pass (a first position at EXP_MIN once left the output at exponent ~EXP_MIN)."""
    rng = np.random.default_rng(len(holes) + d)
    img = _Image(1 << 16)
    lines = []

    def load(n, dst, e, exp, extra=""):
        rec = nx.pack_vector_record(rng.integers(-30000, 30000, n), exp)
        lines.append(f"LOAD addr={img.put(rec):#x} len={n} dst={dst} dst_e=E{e}{extra}")

    load(qh * d, 0, 1, -13)
    first = True
    for t in range(length):
        if t in holes:
            continue
        load(kvh * d, 320, 2, int(rng.integers(-14, -9)), "" if first else " pop_next")
        load(kvh * d, 192, 3, int(rng.integers(-16, -8)), " push_next")
        # KVAPPEND runs in the store queue: the compute queue relays the tokens both ways
        lines += ["NOP queue=compute pop_prev push_next",
                  (f"KVAPPEND k=320 k_e=E2 v=192 v_e=E3 kv_base=7 heads={kvh} head_dim={d} pos_reg=R1 pos_imm={t} "
                   "pop_prev push_prev"), "NOP queue=compute pop_next push_prev"]
        first = False
    lines += [(f"ATTN q=0 q_e=E1 dst=64 dst_e=E4 kv_base=7 q_heads={qh} kv_heads={kvh} head_dim={d} len_reg=R1 "
              f"len_imm={length} stats=100"), "NOP queue=load pop_next", "END"]
    program = isa.assemble("\n".join(lines))
    gold, _, rtl, _ = run_both(program, bytes(img.data), [0, 0])
    assert gold.eregs[4] > nx.EXP_MIN + 100
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs


def test_port_locks_hold_back_unordered_instructions_as_the_golden_model_does(model_dir):
    """Instructions of different queues that share a buffer port, left unordered by tokens: a LOAD against the
    compute queue's buffer writers (VADD, REQ), a STACC against a REQ (the accumulator's read port), and an
    ARGMAXACC beside a GEMV that overwrites its accumulators (it reads none: timing.LOCK_FIELDS). The RTL waits on
    the locks cycle for cycle as the golden model replays them (simultaneous starts in PORT_PRIORITY order), and
    every queue's lock stall is the model's."""
    rng = np.random.default_rng(5)
    image = bytearray(1 << 16)
    for addr in (0x100, 0x400):
        rec = nx.pack_vector_record(rng.integers(-nx.MANT_MAX, nx.MANT_MAX + 1, 64), -15)
        image[addr:addr + len(rec)] = rec
    q = rng.integers(-128, 128, (24, 64))
    sm = rng.integers(1, 1 << 16, (24, 2))
    image[0x1000:0x1000 + 24 * nx.row_stride(64, "int8", 32, CFG.port_bytes)] = nx.pack_rows(q, sm, "int8", 32, CFG.port_bytes)
    # the first REQ holds the accumulator's read port when the STACC arrives; the LOAD that follows seven compute
    # instructions is dispatched once the first VADD (a buffer writer) runs; the second REQ then waits for that LOAD
    program = isa.assemble("""
        REQ acc=200 acc_e=E2 len=8 dst=1280 dst_e=E8
        GEMV addr=0x1000 rows=24 cols=64 fmt=int8 lg_group=2 sexp=-5 x=1536 x_e=E12 acc=16 acc_e=E2
        STACC acc=200 len=8 addr=0xA000
        ARGMAXACC acc=200 len=8 base=0 rd=R7 cont=0
        LOAD addr=0x100 len=64 dst=0 dst_e=E1 push_next
        VADD a=0 a_e=E1 b=0 b_e=E1 dst=512 dst_e=E4 len=64 pop_prev
        REQ acc=16 acc_e=E2 len=24 dst=1280 dst_e=E8
        VADD a=0 a_e=E1 b=0 b_e=E1 dst=640 dst_e=E5 len=64
        VADD a=0 a_e=E1 b=0 b_e=E1 dst=768 dst_e=E6 len=64
        VADD a=0 a_e=E1 b=0 b_e=E1 dst=896 dst_e=E7 len=64
        LOAD addr=0x400 len=64 dst=256 dst_e=E3
        STORE src=2048 src_e=E9 len=32 addr=0x9000
        END
    """)
    gold, gold_counters, rtl, counters = run_both(program, bytes(image))
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs and rtl.regs == gold.regs
    assert rtl.dram.tobytes() == gold.dram[:len(rtl.dram)].tobytes()
    hw = rtl.last_run.hw_counters
    assert counters.cycles == gold_counters.cycles
    assert {q: hw[f"stall_lock_{q}"] for q in isa.QUEUES} == gold_counters.stall_lock
    assert all(gold_counters.stall_lock[q] > 0 for q in isa.QUEUES), gold_counters.stall_lock
    # the ARGMAXACC ran beside the GEMV (accumulate=0 holds no accumulator read port)
    gemv_ports, argmax_ports = (held_ports(i) for i in program if i.op in ("GEMV", "ARGMAXACC"))
    assert "acc_r" not in gemv_ports and not lock_conflicts(gemv_ports, argmax_ports)



def test_req_fold_takes_the_gemv_peak(model_dir):
    """REQ with fold=1 after the GEMV of its range (split-K: the record is the last GEMV's sums) runs its round pass
    alone: the same vector and exponent as the two-pass REQ of the same words, bit-exact with the golden model, and
    each queue's busy cycles and the run's cycles are the timing formulas' (req_cycles with fold). Both ranges
    start an accumulator row (acc_lanes words per cycle), the second with a partial last row."""
    rng = np.random.default_rng(21)
    pb = CFG.port_bytes
    image = bytearray(1 << 16)
    rec = nx.pack_vector_record(rng.integers(-nx.MANT_MAX, nx.MANT_MAX + 1, 128), -15)
    image[0x100:0x100 + len(rec)] = rec
    for base, fmt, rows in ((0x1000, "int4", 24), (0x3000, "int4", 24), (0x5000, "int8", 7)):
        lo, hi = QRANGE[fmt]
        scales = rng.integers(1, 1 << 8, (rows, 2))
        scales[-1] = (1 << 16) - 1  # the peak is the last word written, which the record takes a cycle late
        blob = nx.pack_rows(rng.integers(lo, hi, (rows, 64)), scales, fmt, 32, pb)
        image[base:base + len(blob)] = blob
    program = isa.assemble("""
        LOAD addr=0x100 len=128 dst=0 dst_e=E1 push_next
        GEMV addr=0x1000 rows=24 cols=64 fmt=int4 lg_group=2 sexp=-5 x=0 x_e=E1 acc=16 acc_e=E2 pop_prev
        GEMV addr=0x3000 rows=24 cols=64 fmt=int4 lg_group=2 sexp=-5 x=64 x_e=E1 acc=16 acc_e=E2 accumulate=1
        REQ acc=16 acc_e=E2 len=24 dst=256 dst_e=E7 fold=1
        GEMV addr=0x5000 rows=7 cols=64 fmt=int8 lg_group=2 sexp=-9 x=0 x_e=E1 acc=100 acc_e=E3
        REQ acc=100 acc_e=E3 len=7 dst=384 dst_e=E8 fold=1
        REQ acc=100 acc_e=E3 len=7 dst=512 dst_e=E9
        REQ acc=16 acc_e=E2 len=24 dst=640 dst_e=E10
        END
    """)
    gold, gold_counters, rtl, counters = run_both(program, bytes(image))
    assert np.array_equal(rtl.abuf, gold.abuf)
    assert np.array_equal(rtl.acc, gold.acc)
    assert rtl.eregs == gold.eregs
    assert np.array_equal(rtl.abuf[256:280], rtl.abuf[640:664]) and rtl.eregs[7] == rtl.eregs[10] != nx.EXP_MIN
    assert np.array_equal(rtl.abuf[384:391], rtl.abuf[512:519]) and rtl.eregs[8] == rtl.eregs[9] != nx.EXP_MIN
    for acc, rows in ((16, 24), (100, 7)):
        words = np.abs(rtl.acc[acc:acc + rows])
        assert words.argmax() == rows - 1 and int(words[-1]).bit_length() > int(words[:-1].max()).bit_length()
    for q in isa.QUEUES:
        assert counters.busy[q] == sum(unit_cycles(i) for i in program if i.op != "END" and i.queue == q), q
    assert counters.cycles == gold_counters.cycles
    folded, twin = (unit_cycles(i) for i in program[5:7])
    # the peak pass and its wait: acc=100 starts an accumulator row, read a row of acc_lanes words per cycle
    assert twin - folded == -(-7 // CFG.acc_lanes) + timing.REQ_READ_LATENCY


_GEMV8 = "GEMV addr=0x1000 rows=8 cols=32 fmt=int8 lg_group=2 sexp=0 x=0 x_e=E1 acc=0 acc_e=E2"


@pytest.mark.parametrize("lines, pc", [
    (["REQ acc=0 acc_e=E2 len=4 dst=0 dst_e=E3 fold=1"], 0),
    ([_GEMV8, "REQ acc=0 acc_e=E2 len=7 dst=0 dst_e=E3 fold=1"], 1),
    ([_GEMV8, "REQ acc=1 acc_e=E2 len=8 dst=0 dst_e=E3 fold=1"], 1),
    ([_GEMV8 + " push_next", "KVAPPEND k=0 v=32 kv_base=0 heads=1 head_dim=8 pos_reg=R0 pos_imm=0 pop_prev",
      "ATTN q=0 dst=64 kv_base=0 q_heads=1 kv_heads=1 head_dim=8 len_reg=R0 len_imm=1 stats=0 push_prev",
      "REQ acc=0 acc_e=E2 len=8 dst=0 dst_e=E3 fold=1 pop_next"], 3),
], ids=["no-gemv", "shorter", "shifted", "after-attn"])
def test_req_fold_without_the_record_faults(model_dir, lines, pc):
    """fold=1 is legal only while the GEMV unit's record is the REQ's range (timing.peak_record): before any GEMV,
    over another range, or once an ATTN wrote statistics into its range, the REQ faults SHAPE as the golden model
    refuses it."""
    program = isa.assemble("\n".join([*lines, "END"]))
    with pytest.raises(ExecError, match="peak record"):
        GoldenModel(CFG, bytes(1 << 14)).run(program)
    unfolded = [isa.Instr(i.op, {**i.fields, "fold": 0}, i.deps) if i.op == "REQ" else i for i in program]
    GoldenModel(CFG, bytes(1 << 14)).run(unfolded)  # the same program is legal without fold
    with pytest.raises(RtlError) as info:
        RtlModel(CFG, bytes(1 << 14)).run(program)
    assert (info.value.pc, info.value.code) == (pc, "exec")
    assert "shape" in str(info.value)


def _comb_endpoints_from(netlist, sources):
    """The indices of the cells that end combinational paths (flip-flops, memory ports, the top's outputs) and
    depend combinationally on any net of *sources*."""
    from amaranth.hdl import _nir

    memo = {}

    def depends(net):
        stack = [net]
        while stack:
            n = stack[-1]
            if n in memo:
                stack.pop()
                continue
            if n in sources:
                memo[n] = True
            elif n.is_const or n.cell == 0 or isinstance(netlist.cells[n.cell], (_nir.FlipFlop, _nir.SyncReadPort,
                                                                                    _nir.Instance)):
                memo[n] = False
            else:
                preds = [p for p, _ in netlist.cells[n.cell].comb_edges_to(n.bit)]
                todo = [p for p in preds if p not in memo]
                if todo:
                    stack.extend(todo)
                    continue
                memo[n] = any(memo[p] for p in preds)
            stack.pop()
        return memo[net]

    registers = (_nir.Top, _nir.FlipFlop, _nir.SyncWritePort, _nir.SyncReadPort)
    return {idx for idx, cell in enumerate(netlist.cells)
            if isinstance(cell, registers) and any(depends(n) for n in cell.input_nets())}


@pytest.fixture(scope="module")
def tiny_netlist():
    from amaranth.hdl import Fragment
    from amaranth.hdl._ir import build_netlist
    from kvoverlay.hw.export import top_ports
    from kvoverlay.hw.overlay import Overlay

    ov = Overlay(CFG)
    return ov, build_netlist(Fragment.get(ov, None), ports=top_ports(ov))


def test_instruction_word_ends_in_the_front_ends_decode_registers(tiny_netlist):
    """The memory's instruction word is decoded into registers of the front end: no queue's write enable, executor
    or unit depends on it combinationally (the memory's read data ran through the decode into the queues)."""
    from amaranth.hdl import _nir

    ov, nl = tiny_netlist
    sources = {n for sig, v in nl.signals.items() if sig is ov.insn_data for n in v}
    assert len(sources) == isa.INSN_BITS
    ends = _comb_endpoints_from(nl, sources)
    assert ends
    for idx in ends:
        cell = nl.cells[idx]
        assert isinstance(cell, _nir.FlipFlop) and nl.modules[cell.module_idx].name[-1] == "frontend", cell


def test_queue_heads_are_registered(tiny_netlist):
    """Each queue FIFO's read data ends in the overlay's head registers: the executors' starts, the port locks
    between the queues and the units' commands begin at flip-flops, not at the FIFOs' LUT-RAM reads."""
    from amaranth.hdl import _nir

    _, nl = tiny_netlist
    for q in isa.QUEUES:
        reads = [cell for cell in nl.cells if isinstance(cell, _nir.AsyncReadPort)
                 and nl.modules[cell.module_idx].name[-1] == f"{q}_queue"]
        assert reads, q
        sources = {n for cell in reads for n in _nir.Value(cell.output_nets(nl.cells.index(cell)))}
        ends = _comb_endpoints_from(nl, sources)
        assert ends, q
        for idx in ends:
            cell = nl.cells[idx]
            assert isinstance(cell, _nir.FlipFlop) and len(nl.modules[cell.module_idx].name) == 1, (q, cell)


def test_flat_port_locks_need_transitive_conflicts(monkeypatch):
    """The overlay's same-cycle locks (each queue yields to an earlier one that could start a conflicting
    instruction) equal the golden replay's only while the conflicts are transitive down PORT_PRIORITY: true of the
    table, and a table where the store queue blocks the load queue, which blocks the compute queue, which the store
    queue does not block, is refused at elaboration."""
    from kvoverlay.hw.overlay import _check_flat_priority

    _check_flat_priority()
    monkeypatch.setitem(timing.PORT_LOCKS, "LOAD", ("abuf_w", "acc_r"))
    monkeypatch.setitem(timing.PORT_LOCKS, "STACC", ("abuf_w",))
    with pytest.raises(ValueError, match="blocks compute"):
        _check_flat_priority()
