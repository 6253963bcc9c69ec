# amaranth: UnusedElaboratable=no
"""AttentionEngine + KvBuffer under Verilator via cocotb, with sim/golden.py GoldenModel as the scoreboard.

One Verilator build of the ``tiny`` preset serves every case: each case loads its activation
buffer and registers through host ports, runs KVAPPENDs then ATTN, and reads back the output
vector, the exponent registers, the statistics words and the KV rows, which must equal the
golden model's state bit for bit; busy cycles must equal the formulas of kvoverlay.timing.
"""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("amaranth")
pytest.importorskip("cocotb_tools")

from amaranth.back import verilog
from amaranth.sim import Simulator
from cocotb_tools.runner import get_results, get_runner
from kvoverlay.hw.attention import AttentionEngine, AttnDecoder, Exp2Neg, OutputStage, attention_widths
from kvoverlay.hw.ports import Fault
from kvoverlay.hw.sim_attention import TOP_NAME, AttentionSimTop
from kvoverlay.sim.golden import GoldenModel
from kvoverlay.sim.rtl import prune_build

from kvoverlay import isa, numerics, toolchain
from kvoverlay.config import PRESETS
from kvoverlay.timing import ATTN_DECODE_CYCLES, ATTN_EXP2_LATENCY, attn_cycles, attn_output_lanes, kvappend_cycles

TESTS = Path(__file__).parent
CFG = PRESETS["tiny"]
AL = 2 * CFG.port_bytes  # activation-buffer lanes per word
LANES = CFG.vector_lanes
Q_ADDR, DST_ADDR, TOKENS_ADDR = 0, 8 * AL, 16 * AL
POS_REG, LEN_REG = 1, 2
Q_E, DST_E = 0, 31
#: Token t uses exponent registers K_E0 + t % NE (keys) and V_E0 + t % NE (values).
K_E0, V_E0, NE = 1, 13, 12


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    toolchain.ensure_verilator()
    work = tmp_path_factory.mktemp("attention")
    src = work / f"{TOP_NAME}.v"
    src.write_text(verilog.convert(AttentionSimTop(CFG), name=TOP_NAME))
    runner = get_runner("verilator")
    runner.build(sources=[src], hdl_toplevel=TOP_NAME, build_dir=work / "build",
                 build_args=["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC"])
    prune_build(work / "build")
    return {"runner": runner, "work": work, "n": 0}


def _pack(values, lanes):
    mask = 0xFFFF
    word = 0
    for i, v in enumerate(values):
        word |= (int(v) & mask) << (16 * i)
    return word


def _unpack(word, lanes):
    out = []
    for i in range(lanes):
        v = (word >> (16 * i)) & 0xFFFF
        out.append(v - 0x10000 if v & 0x8000 else v)
    return out


class Scenario:
    """Initial state plus a program; runs on the golden model and on the RTL."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.abuf = np.zeros(CFG.act_buffer_words, np.int64)
        self.eregs = {}
        self.regs = {}
        self.program = []
        self.read_abuf = set()
        self.read_acc = []
        self.read_kv = []

    def append_tokens(self, kv_base, heads, head_dim, length, *, offset=0, base=TOKENS_ADDR, v_exp=None, v_top=None,
                      same=False):
        """KVAPPENDs of *length* random tokens at positions 0.. (through R[POS_REG] + pos_imm) into the KV-pool
        columns from *kv_base* on.

        *v_exp* fixes every value exponent, *v_top* bounds the value mantissas (0: all zero), *same*
        repeats the first token with values -2**15 (equal scores: the softmax sum grows with the length).
        """
        rng = self.rng
        n = heads * head_dim
        stride = -(-(2 * n + offset + 1) // AL) * AL
        self.regs[POS_REG] = int(rng.integers(0, 4))
        for i in range(NE):
            self.eregs[K_E0 + i] = int(rng.integers(-17, -11))
            self.eregs[V_E0 + i] = int(rng.integers(-20, -7)) if v_exp is None else v_exp
        for t in range(length):
            k_addr = base + t * stride + offset
            v_addr = k_addr + n
            if same and t:
                self.abuf[k_addr:k_addr + 2 * n] = self.abuf[base + offset:base + offset + 2 * n]
                self.eregs[K_E0 + t % NE] = self.eregs[K_E0]
            else:
                # varied magnitudes: some tokens use only a few mantissa bits
                top = int(rng.choice([1 << 15, 1 << 12, 1 << 6]))
                self.abuf[k_addr:k_addr + n] = rng.integers(-top + 1, top, n)
                vtop = top if v_top is None else v_top
                self.abuf[v_addr:v_addr + n] = rng.integers(-vtop + 1, vtop, n) if vtop else 0
                if same:  # int16's most negative value: the output's peak is an exact power of two
                    self.abuf[v_addr:v_addr + n] = -numerics.MANT_MAX - 1
            self.program.append(isa.Instr("KVAPPEND", {
                "k": k_addr, "k_e": K_E0 + t % NE, "v": v_addr, "v_e": V_E0 + t % NE, "kv_base": kv_base,
                "heads": heads, "head_dim": head_dim, "pos_reg": POS_REG, "pos_imm": t - self.regs[POS_REG]}))
        cols = CFG.kv_head_columns(head_dim)
        self.read_kv += [(kv_base, h, cols, p, c, head_dim) for h in range(heads) for p in range(length)
                         for c in range(cols)]
        return base + length * stride

    def attend(self, kv_base, q_heads, kv_heads, head_dim, length, *, stats=5, q_exp=None):
        """An ATTN of random q (exponent *q_exp*, else one that keeps every score a right shift of its dot)."""
        rng = self.rng
        n = q_heads * head_dim
        self.abuf[Q_ADDR:Q_ADDR + n] = rng.integers(-32767, 32768, n)
        self.eregs[Q_E] = int(rng.integers(-16, -13)) if q_exp is None else q_exp
        self.regs[LEN_REG] = int(rng.integers(0, 3))
        self.program.append(isa.Instr("ATTN", {
            "q": Q_ADDR, "q_e": Q_E, "dst": DST_ADDR, "dst_e": DST_E, "kv_base": kv_base, "q_heads": q_heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "len_reg": LEN_REG, "len_imm": length - self.regs[LEN_REG],
            "stats": stats}))
        self.read_abuf |= set(range(DST_ADDR // AL, (DST_ADDR + n + AL - 1) // AL))
        self.read_acc = list(range(stats, stats + 2 * q_heads))

    def golden(self):
        g = GoldenModel(CFG)
        g.abuf[:] = self.abuf
        for i, v in self.eregs.items():
            g.eregs[i] = v
        for i, v in self.regs.items():
            g.regs[i] = v
        errors, lengths = [], []
        for ins in self.program:
            try:
                lengths.append(g.step(ins))
                errors.append(False)
            except (ValueError, IndexError, ArithmeticError):
                lengths.append(None)
                errors.append(True)
        return g, errors

    def run_rtl(self, build):
        build["n"] += 1
        work = build["work"]
        tag = f"case{build['n']}"
        used = np.flatnonzero(self.abuf)
        last_word = int(used[-1]) // AL + 1 if used.size else 0
        case = {
            "abuf": [[w, _pack(self.abuf[w * AL:(w + 1) * AL], AL)] for w in range(last_word)],
            "eregs": sorted(self.eregs.items()), "regs": sorted(self.regs.items()),
            "program": [isa.encode(i) for i in self.program],
            "read_abuf": sorted(self.read_abuf), "read_acc": self.read_acc,
            "read_kv": [c[:5] for c in self.read_kv],
            "num_eregs": isa.NUM_EREGS, "result": str(work / f"result_{tag}.json"),
        }
        case_file = work / f"{tag}.json"
        case_file.write_text(json.dumps(case))
        xml = build["runner"].test(hdl_toplevel=TOP_NAME, test_module="cocotb_attention", test_dir=TESTS,
                                   build_dir=work / "build", extra_env={"ATTN_CASE": str(case_file)},
                                   results_xml=str(work / f"results_{tag}.xml"))
        _, failed = get_results(xml)
        assert failed == 0
        return json.loads(Path(case["result"]).read_text())

    def check(self, build):
        """Run both models and compare every piece of state the program touched."""
        g, errors = self.golden()
        res = self.run_rtl(build)
        assert [r["fault"] != Fault.NONE.value for r in res["instrs"]] == errors
        for ins, r, err in zip(self.program, res["instrs"], errors):
            f = ins.fields
            if err and r["fault"] == Fault.OVERFLOW.value:
                length = self.regs[f["len_reg"]] + f["len_imm"]
                assert r["cycles"] == attn_cycles(CFG, f["q_heads"], f["head_dim"], length, overflow=True)
            elif err:
                assert r["cycles"] == ATTN_DECODE_CYCLES + 1, "a rejected instruction costs its decode and done cycles only"
            elif ins.op == "KVAPPEND":
                assert r["cycles"] == kvappend_cycles(CFG, f["heads"], f["head_dim"])
            else:
                length = self.regs[f["len_reg"]] + f["len_imm"]
                assert r["cycles"] == attn_cycles(CFG, f["q_heads"], f["head_dim"], length)
        assert len(res["abuf"]) == len(self.read_abuf) and len(res["acc"]) == len(self.read_acc)
        assert len(res["kv"]) == len(self.read_kv) and len(res["instrs"]) == len(self.program)
        assert res["eregs"] == [int(e) for e in g.eregs]
        for w, word in zip(sorted(self.read_abuf), res["abuf"]):
            assert _unpack(word, AL) == [int(v) for v in g.abuf[w * AL:(w + 1) * AL]], f"abuf word {w}"
        acc = [v - (1 << 64) if v >> 63 else v for v in res["acc"]]
        assert acc == [int(g.acc[a]) for a in self.read_acc]
        for (base, h, _, p, c, d), (k, v, ek, ev) in zip(self.read_kv, res["kv"]):
            first = int(g.kv_words(base, h, p, d))  # whole words: the lanes a write masked keep their contents
            assert _unpack(k, LANES) == [int(x) for x in g.kv_k[first + c]], (base, h, p, c)
            assert _unpack(v, LANES) == [int(x) for x in g.kv_v[first + c]], (base, h, p, c)
            assert (ek, ev) == (int(g.kv_ek[first]), int(g.kv_ev[first]))
        return g, res


def test_kvappend_bit_exact(build):
    """Two heads of an odd head_dim (head 1 starts mid-word) from unaligned slices at an odd pool column, then
    overwrite a position."""
    s = Scenario(1)
    end = s.append_tokens(37, 2, 10, 6, offset=3)
    # the same position again (a token rewritten) and a single-head token of another layer
    s.abuf[end:end + 20] = s.rng.integers(-32767, 32768, 20)
    s.program.append(isa.Instr("KVAPPEND", {"k": end, "k_e": 5, "v": end + 10, "v_e": 6, "kv_base": 37, "heads": 1,
                                            "head_dim": 10, "pos_reg": POS_REG, "pos_imm": 4 - s.regs[POS_REG]}))
    s.check(build)


def test_kvappend_errors(build):
    """KV full (position = capacity, negative), bad geometry and buffer overrun are errors with no side effect."""
    s = Scenario(2)
    s.append_tokens(0, 1, 8, 2)
    base = {"k": TOKENS_ADDR, "k_e": 1, "v": TOKENS_ADDR + 8, "v_e": 2, "kv_base": 0, "heads": 1, "head_dim": 8,
            "pos_reg": POS_REG}
    bad = [
        {"pos_imm": CFG.kv_capacity - s.regs[POS_REG]},
        {"pos_imm": -1 - s.regs[POS_REG]},
        {"pos_imm": 0, "kv_base": CFG.kv_columns - 1},  # its 2 columns run past the pool
        {"pos_imm": 0, "heads": 0},
        {"pos_imm": 0, "head_dim": CFG.max_head_dim + 2},
        {"pos_imm": 0, "v": CFG.act_buffer_words - 4},
    ]
    s.program += [isa.Instr("KVAPPEND", {**base, **b}) for b in bad]
    s.program.append(isa.Instr("KVAPPEND", {**base, "pos_imm": CFG.kv_capacity - 1 - s.regs[POS_REG]}))
    _, res = s.check(build)
    codes = [r["fault"] for r in res["instrs"][2:-1]]
    assert codes == [Fault.KV_RANGE.value] * 2 + [Fault.SHAPE.value] * 3 + [Fault.OUT_OF_RANGE.value]


#: (q_heads, kv_heads, head_dim, kv_len)
ATTN_CASES = {
    "len1": (1, 1, 16, 1),
    "partial_tile": (2, 2, 16, 5),
    "one_tile": (1, 1, 16, CFG.attn_tile),
    "tiles": (2, 2, 12, 3 * CFG.attn_tile + 3),
    "full_capacity": (1, 1, 16, CFG.kv_capacity),
    "gqa_4on2": (4, 2, 16, 19),
    "gqa_4on1": (4, 1, 10, 13),
    "odd_head_dim": (2, 1, 7, 2 * CFG.attn_tile),
    "one_chunk": (2, 1, LANES, 2 * CFG.attn_tile + 3),  # a position is one chunk: the tightest rescale hazard
    "max_kv_heads": (CFG.max_kv_heads, CFG.max_kv_heads, 8, 10),
    "max_head_dim": (1, 1, CFG.max_head_dim, CFG.attn_tile + 1),
    "gqa_full_capacity": (4, 2, 16, CFG.kv_capacity),  # the demo decoder's layer at a full KV
}


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attn_bit_exact(build, name):
    qh, kvh, d, length = ATTN_CASES[name]
    s = Scenario(100 + list(ATTN_CASES).index(name))
    # layers at varied pool columns, the last case's heads ending at the pool's last column
    kv_base = CFG.kv_columns - kvh * CFG.kv_head_columns(d) if name == "max_head_dim" else 5 * list(ATTN_CASES).index(name)
    s.append_tokens(kv_base, kvh, d, length)
    s.attend(kv_base, qh, kvh, d, length)
    g, res = s.check(build)
    # the output is a real softmax: nonzero and normalized
    out = g.abuf[DST_ADDR:DST_ADDR + qh * d]
    assert np.max(np.abs(out)) >= 1 << (numerics.MANT_BITS - 1)
    print(f"ATTN {name}: {res['instrs'][-1]['cycles']} cycles")


def test_attn_errors(build):
    """Length 0, length beyond capacity, q_heads not a multiple of kv_heads, stats beyond the accumulator buffer."""
    s = Scenario(3)
    s.append_tokens(0, 2, 8, 3)
    s.attend(0, 2, 2, 8, 3)
    good = s.program[-1].fields
    bad = [
        {"len_imm": -s.regs[LEN_REG]},
        {"len_imm": CFG.kv_capacity + 1 - s.regs[LEN_REG]},
        {"q_heads": 3},
        {"stats": CFG.acc_buffer_words - 2},
    ]
    s.program = s.program[:-1] + [isa.Instr("ATTN", {**good, **b}) for b in bad] + [s.program[-1]]
    _, res = s.check(build)
    codes = [r["fault"] for r in res["instrs"][3:-1]]
    assert codes == [Fault.KV_RANGE.value] * 2 + [Fault.SHAPE.value, Fault.OUT_OF_RANGE.value]


@pytest.mark.parametrize("kind", ["underflow", "zero_values", "overflow"])
def test_attn_exponent_extremes(build, kind):
    """Output exponent below EXP_MIN (mantissas shifted down), an all-zero output (EXP_MIN), and above EXP_MAX (error)."""
    s = Scenario(7)
    if kind == "underflow":
        s.append_tokens(1, 2, 8, 11, v_exp=numerics.EXP_MIN)
    elif kind == "zero_values":
        s.append_tokens(1, 2, 8, 11, v_top=0)
    else:
        s.append_tokens(1, 2, 8, 4, v_exp=numerics.EXP_MAX, same=True)
    length = 4 if kind == "overflow" else 11
    s.attend(1, 2, 2, 8, length)
    if kind == "overflow":
        s.read_acc = []  # a fault found after the heads ran leaves their statistics written
    g, res = s.check(build)
    code = res["instrs"][-1]["fault"]
    if kind == "overflow":
        assert code == Fault.OVERFLOW.value
    else:
        assert code == Fault.NONE.value
        assert g.eregs[DST_E] == numerics.EXP_MIN
        out = g.abuf[DST_ADDR:DST_ADDR + 16]
        assert (np.max(np.abs(out)) == 0) == (kind == "zero_values")


def test_attn_saturated_scores(build):
    """q and k exponents summing above -SCORE_FRAC shift scores left: the larger dot products saturate at
    ATTN_SCORE_MAX (numerics.attention_scores), the smaller ones do not, and the differences between them reach
    far past 2^-x's cut-off."""
    s = Scenario(8)
    s.append_tokens(1, 2, 16, 2 * CFG.attn_tile + 3)
    s.attend(1, 2, 2, 16, 2 * CFG.attn_tile + 3, q_exp=9)
    g, _ = s.check(build)
    m = [int(g.acc[a]) for a in s.read_acc[0::2]]
    assert numerics.ATTN_SCORE_MAX in m  # a head whose largest score saturated


def test_attn_largest_sum_and_accumulator(build):
    """The bounds attention_widths derives, reached: kv_capacity equal scores (p = 1 everywhere, l = L * 2**15) over
    values of -2**15 at one exponent (every term -2**30, |acc| = L * 2**30)."""
    s = Scenario(9)
    d, length = 16, CFG.kv_capacity
    s.append_tokens(0, 1, d, length, v_exp=-9, same=True)
    s.attend(0, 1, 1, d, length)
    g, _ = s.check(build)
    widths = attention_widths(CFG)
    l = int(g.acc[s.read_acc[1]])
    assert l == length * numerics.GATE_ONE and l.bit_length() == widths.sum


def test_attention_widths_hold():
    """numerics.attention_head at the extremes of every preset stays inside attention_widths: the running max within
    the score width, l in [2**15, 2**sum), the output within its width, and the dot product within its width."""
    rng = np.random.default_rng(12)
    for cfg in PRESETS.values():
        w = attention_widths(cfg)
        d, L = cfg.max_head_dim, cfg.kv_capacity
        extremes = [(np.full(d, -1 << 15), np.full((L, d), -1 << 15), np.full((L, d), -1 << 15), 0, -9),
                    (rng.integers(-1 << 15, 1 << 15, d), rng.integers(-1 << 15, 1 << 15, (L, d)),
                     rng.integers(-1 << 15, 1 << 15, (L, d)), 40, -200)]
        for q, k, v, eq, ev in extremes:
            ek = rng.integers(numerics.EXP_MIN, numerics.EXP_MAX + 1, L) if eq else np.full(L, -9)
            assert int(np.max(np.abs(k @ q))) < 1 << (w.dot - 1)
            o, _, m, l = numerics.attention_head(q, eq, k, ek, v, np.full(L, ev), cfg.attn_tile)
            assert abs(m) < 1 << (w.score - 1)
            assert numerics.GATE_ONE <= l < 1 << w.sum
            assert int(np.max(np.abs(o))) < 1 << (w.out - 1)


def test_lanes_wider_than_abuf_word_rejected():
    cfg = CFG.replace(vector_lanes=4 * AL)
    with pytest.raises(ValueError, match=f"vector_lanes={4 * AL}"):
        AttentionEngine(cfg)


def test_exp2_neg_matches_numerics():
    """The softmax stage's 2^-x against numerics.exp2_neg_q15: every table segment, the cut-off at 2^-16, and the
    whole range a difference of two saturated scores can take (where -d * log2(e) is far past the cut)."""
    rng = np.random.default_rng(11)
    one = 1 << numerics.SCORE_FRAC
    widths = attention_widths(CFG)
    lowest = -2 * numerics.ATTN_SCORE_MAX
    # -d * log2(e) just past each integer n: the table's top (GATE_ONE, the top bit of its unsigned 16) shifted right
    # by n >= 1, where a shifter that reads its value's top bit as a sign gives -(GATE_ONE >> n) (the demo decoder's
    # logits at a 24-token KV)
    first = [-(-(n << (2 * numerics.SCORE_FRAC)) // numerics.LOG2E_Q16) for n in range(1, 17)]
    table_top = [-(f + k) for f in first for k in range(3)]
    ds = np.concatenate([
        [0, -1, -one, -11 * one, -12 * one, lowest, lowest + 1, -(1 << 20), -(1 << 20) + 1],
        -rng.integers(0, 12 * one, 300),
        -rng.integers(0, -lowest, 100),
        table_top,
    ]).astype(np.int64)
    assert lowest >= -(1 << (widths.diff - 1))
    dut = Exp2Neg(widths.diff)
    got = []

    async def tb(ctx):
        # a new difference every cycle; each p comes out ATTN_EXP2_LATENCY cycles after its difference
        for i in range(len(ds) + ATTN_EXP2_LATENCY):
            ctx.set(dut.d, int(ds[i]) if i < len(ds) else 0)
            await ctx.tick()
            if i + 1 >= ATTN_EXP2_LATENCY:
                got.append(ctx.get(dut.p))
        del got[len(ds):]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    expected = [int(p) for p in numerics.exp2_neg_q15(ds)]
    assert got == expected
    assert expected[0] == numerics.GATE_ONE and expected[4] == 0  # exp(0) is one; 2^-16 and below are zero
    assert {numerics.GATE_ONE >> n for n in range(1, 16)} <= set(expected)  # the table's top, shifted


def test_q_heads_beyond_scratch_fault():
    """An ATTN of more query heads than max_q_heads (the output scratch's bound) faults SHAPE in the decoder, and the
    golden model refuses it; max_q_heads itself runs. The scratch holds exactly max_q_heads * max_head_dim elements."""
    cfg = CFG.replace(max_q_heads=4)
    assert cfg.attn_out_words == 4 * cfg.max_head_dim < CFG.attn_out_words == CFG.act_buffer_words
    dec = AttnDecoder(cfg)
    fields = {"q": 0, "q_e": 0, "dst": 0, "dst_e": 1, "kv_base": 0, "kv_heads": 1, "head_dim": 8, "len_reg": 0,
              "len_imm": 1, "stats": 0}
    faults = {}

    async def tb(ctx):
        for qh in (4, 5):
            ctx.set(dec.insn.as_value(), isa.encode(isa.Instr("ATTN", {**fields, "q_heads": qh})))
            ctx.set(dec.start, 1)
            await ctx.tick()
            ctx.set(dec.start, 0)
            await ctx.tick().repeat(ATTN_DECODE_CYCLES - 2)
            assert ctx.get(dec.done)
            faults[qh] = Fault(ctx.get(dec.fault))
            await ctx.tick()

    sim = Simulator(dec)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    assert faults == {4: Fault.NONE, 5: Fault.SHAPE}
    g = GoldenModel(cfg)
    g.step(isa.Instr("KVAPPEND", {"k": 0, "k_e": 0, "v": 0, "v_e": 0, "kv_base": 0, "heads": 1, "head_dim": 8,
                                  "pos_reg": 0, "pos_imm": 0}))
    g.step(isa.Instr("ATTN", {**fields, "q_heads": 4}))
    with pytest.raises(ValueError, match="max_q_heads=4"):
        g.step(isa.Instr("ATTN", {**fields, "q_heads": 5}))
    words = OutputStage(cfg).signature.members["scratch"].signature.members["addr"].shape
    assert words == range(cfg.attn_out_words // attn_output_lanes(cfg))

