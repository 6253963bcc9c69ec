"""VectorUnit under Verilator via cocotb, scored by the golden model bit for bit, with exact cycle counts.

One Verilator build of the ``tiny`` preset runs every case: the cocotb module loads each
case's buffer window and registers through host ports, runs one instruction and reads the
state back; every case is compared with ``GoldenModel.step`` on the same state.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("amaranth")
pytest.importorskip("cocotb_tools")

from amaranth.back import verilog
from cocotb_tools.runner import get_results, get_runner
from kvoverlay.hw.ports import EREG_SHAPE, Fault
from kvoverlay.hw.sim_vector_unit import TOP_NAME, VectorUnitSimTop
from kvoverlay.hw.vector_unit import VectorUnit, abuf_lanes
from kvoverlay.sim.golden import GoldenModel
from kvoverlay.sim.rtl import prune_build

from kvoverlay import isa, toolchain
from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS
from kvoverlay.timing import VECTOR_OPS, VECTOR_SETUP_CYCLES, vector_cycles

TESTS = Path(__file__).parent
CFG = PRESETS["tiny"]
L = abuf_lanes(CFG)
V = CFG.vector_lanes
DEPTH = CFG.act_buffer_words // L
I16 = (-(1 << 15), 1 << 15)


def _pack(vals) -> int:
    word = 0
    for k, v in enumerate(vals):
        word |= (int(v) & 0xFFFF) << (16 * k)
    return word


def _unpack(word: int, lanes: int = L):
    vals = [(word >> (16 * k)) & 0xFFFF for k in range(lanes)]
    return [v - (1 << 16) if v >> 15 else v for v in vals]


class Case:
    """One instruction on a prepared state, with the golden model's verdict."""

    def __init__(self, rng, op, fields, vectors, eregs, label, expect_code=None, cfg=CFG):
        self.op, self.fields, self.label = op, dict(fields), label
        L = self.lanes = abuf_lanes(cfg)
        DEPTH = cfg.act_buffer_words // L
        self.ins = isa.Instr(op, {f.name: fields.get(f.name, 0) for f in isa.BY_NAME[op].fields})
        spans = [(addr, len(v)) for addr, v in vectors]
        for name in ("dst",):
            if name in fields:
                n = fields["heads"] * fields["head_dim"] if op == "ROPE" else fields["len"]
                spans.append((fields[name], n))
        lo = max(0, min(a for a, _ in spans) // L - 1)
        hi = min(DEPTH, max(-(-(a + n) // L) for a, n in spans) + 1)
        self.w0, self.nw = lo, hi - lo
        abuf = rng.integers(*I16, size=self.nw * L)
        for addr, v in vectors:
            abuf[addr - lo * L: addr - lo * L + len(v)] = v
        self.eregs = [int(e) for e in rng.integers(nx.EXP_MIN, nx.EXP_MAX + 1, size=isa.NUM_EREGS)]
        for i, e in eregs.items():
            self.eregs[i] = int(e)
        self.regs = [int(r) for r in rng.integers(0, 1 << 20, size=isa.NUM_REGS)]
        gm = GoldenModel(cfg)
        gm.abuf[lo * L: hi * L] = abuf
        gm.eregs = list(self.eregs)
        gm.regs = list(self.regs)
        self.words = [_pack(abuf[i * L:(i + 1) * L]) for i in range(self.nw)]
        self.expect_code = expect_code
        try:
            gm.step(self.ins)
            self.golden_error = False
        except (ArithmeticError, ValueError, IndexError) as exc:
            self.golden_error = True
            gm = None
            if self.expect_code is None:  # the golden model's fault, as the unit reports it
                self.expect_code = (Fault.OVERFLOW if isinstance(exc, ArithmeticError)
                                    else Fault.OUT_OF_RANGE if isinstance(exc, IndexError) else Fault.SHAPE)
        if gm is not None and expect_code is None:
            self.exp_words = [[int(v) for v in gm.abuf[(lo + i) * L:(lo + i + 1) * L]] for i in range(self.nw)]
            self.exp_eregs, self.exp_regs = [int(e) for e in gm.eregs], [int(r) for r in gm.regs]
        else:
            self.exp_words = [_unpack(w, L) for w in self.words]
            self.exp_eregs, self.exp_regs = self.eregs, self.regs

    def spec(self):
        return {"words": [[self.w0 + i, w] for i, w in enumerate(self.words)], "eregs": self.eregs,
                "regs": self.regs, "insn": isa.encode(self.ins)}


def _vec(rng, n, kind="random"):
    if kind == "zeros":
        return np.zeros(n, np.int64)
    if kind == "equal":
        return np.full(n, int(rng.integers(*I16)), np.int64)
    if kind == "max":
        return rng.choice([-(1 << 15), -nx.MANT_MAX, nx.MANT_MAX], size=n).astype(np.int64)
    if kind == "small":
        return rng.integers(-4, 5, size=n)
    return rng.integers(*I16, size=n)


LENS = [1, 3, 4, 5, 16, 17, 31, 64, 70]
KINDS = ["random", "random", "zeros", "equal", "max", "small"]


def _addr(rng, words=40):
    return int(rng.integers(0, words)) * L


def _binary_cases(rng):
    out = []
    for op in ("VADD", "VMUL", "VSCALE"):
        for i in range(24):
            n = LENS[i % len(LENS)] if i < len(LENS) else int(rng.integers(1, 80))
            kind = KINDS[i % len(KINDS)]
            a = 0
            b = a + (-(-n // L) + 1) * L
            dst = b + (-(-n // L) + 1) * L if i % 3 else a  # every third in place
            base = _addr(rng, 300)
            a, b, dst = a + base, b + base, dst + base
            if i % 4 == 0:
                ea, eb = (int(x) for x in rng.integers(-30, 10, size=2))
            elif i % 4 == 1:  # far apart: the smaller operand rounds away
                ea, eb = int(rng.integers(-20, 0)), int(rng.integers(-60, -20))
            elif i % 4 == 2:  # near EXP_MIN: underflow
                ea, eb = int(rng.integers(nx.EXP_MIN, nx.EXP_MIN + 20)), int(rng.integers(-300, -200))
            else:  # near EXP_MAX: may overflow
                ea, eb = int(rng.integers(nx.EXP_MAX - 20, nx.EXP_MAX + 1)), int(rng.integers(200, 300))
            va, vb = _vec(rng, n, kind), _vec(rng, n, KINDS[(i + 1) % len(KINDS)])
            fields = {"a": a, "a_e": 1, "dst": dst, "dst_e": 3, "len": n}
            vectors = [(a, va)]
            eregs = {1: ea}
            if op == "VSCALE":
                fields.update(imm_m=int(rng.integers(*I16)), imm_e=int(rng.integers(-64, 64)))
                if i % 4 == 3:
                    fields["imm_e"] = int(rng.integers(0, 64))
            else:
                fields.update(b=b, b_e=2)
                vectors.append((b, vb))
                eregs[2] = eb
            out.append(Case(rng, op, fields, vectors, eregs, f"{op}-{i}-{kind}-n{n}"))
    # round-half-up ties on negative values: peak 65534 needs one bit of rounding
    out.append(Case(rng, "VMUL", {"a": 0, "a_e": 1, "b": L, "b_e": 2, "dst": 2 * L, "dst_e": 3, "len": 5},
                    [(0, np.array([32767, -3, 3, -1, -5])), (L, np.array([2, 1, 1, 1, 1]))], {1: 0, 2: 0}, "VMUL-ties"))
    out.append(Case(rng, "VADD", {"a": 0, "a_e": 1, "b": L, "b_e": 2, "dst": 2 * L, "dst_e": 3, "len": 4},
                    [(0, np.array([-3, 5, -7, 9])), (L, np.array([-32768, 1, 1, 1]))], {1: -17, 2: 0}, "VADD-ties"))
    return out


def _act_cases(rng):
    out = []
    for func in range(len(isa.ENUMS["func"])):
        for i, ex in enumerate([-12, -11, -14, -18, -8, -3, 0, 20, 35, -40, nx.EXP_MIN, -25]):
            n = LENS[i % len(LENS)] if i < len(LENS) else int(rng.integers(1, 80))
            x = _addr(rng, 300)
            dst = x if i % 3 == 0 else x + (-(-n // L) + 1) * L
            v = _vec(rng, n, KINDS[i % len(KINDS)])
            out.append(Case(rng, "ACT", {"x": x, "x_e": 4, "dst": dst, "dst_e": 5, "len": n, "func": func},
                            [(x, v)], {4: ex}, f"ACT-{isa.ENUMS['func'][func]}-ex{ex}-n{n}"))
    return out


def _argmax_cases(rng):
    out = []
    for i in range(14):
        n = LENS[i % len(LENS)] if i < len(LENS) else int(rng.integers(1, 90))
        v = _vec(rng, n, ["random", "equal", "max", "small"][i % 4])
        if i % 5 == 1 and n > 3:  # repeated maximum: the first one wins
            v[n // 3] = v[n - 1] = 32767
        if i % 5 == 2:
            v = -np.abs(np.clip(v, -nx.MANT_MAX, nx.MANT_MAX)) - 1
        x = _addr(rng, 400)
        out.append(Case(rng, "ARGMAX", {"x": x, "len": n, "rd": int(rng.integers(0, isa.NUM_REGS))}, [(x, v)], {},
                        f"ARGMAX-{i}-n{n}"))
    return out


def _rope_cases(rng):
    out = []
    shapes = [(1, 2), (1, 8), (2, 6), (3, 4), (4, 16), (2, 10), (1, 64), (3, 2)]
    for mode in range(len(isa.ENUMS["rope"])):
        for i, (h, d) in enumerate(shapes):
            n = h * d
            x = _addr(rng, 300) + (int(rng.integers(0, L)) if i % 3 == 2 else 0)
            dst = x if i % 2 == 0 else x + (-(-n // L) + 1) * L + (3 if i % 4 == 3 else 0)
            cos = dst + n + int(rng.integers(1, 40))
            sin = cos + d // 2 if i % 2 else cos + d // 2 + int(rng.integers(0, 20))
            ex, ec, es = int(rng.integers(-20, 5)), int(rng.integers(-20, -10)), int(rng.integers(-20, -10))
            if i == 5:
                ec, es = -15, -50  # sin far below cos: its products round away
            if i == 7:
                ex = nx.EXP_MIN + 5
            vectors = [(x, _vec(rng, n, KINDS[i % len(KINDS)])), (cos, _vec(rng, d // 2)), (sin, _vec(rng, d // 2))]
            fields = {"x": x, "x_e": 6, "cos": cos, "cos_e": 7, "sin": sin, "sin_e": 8, "dst": dst, "dst_e": 9,
                      "heads": h, "head_dim": d, "mode": mode}
            out.append(Case(rng, "ROPE", fields, vectors, {6: ex, 7: ec, 8: es},
                            f"ROPE-{isa.ENUMS['rope'][mode]}-{h}x{d}-{i}"))
    return out


def _norm_cases(rng):
    out = []
    for kind in range(len(isa.ENUMS["norm"])):
        for i in range(12):
            n = LENS[i % len(LENS)] if i < len(LENS) else int(rng.integers(1, 100))
            x = _addr(rng, 300)
            g = x + (-(-n // L) + 1) * L
            dst = x if i % 3 == 0 else g + (-(-n // L) + 1) * L
            ex, eg = int(rng.integers(-20, 6)), int(rng.integers(-20, 1))
            vx = _vec(rng, n, KINDS[i % len(KINDS)])
            base = 2 * ex - 32
            # eps shift (eps_e - base) kept <= 40: numerics computes eps and the total in int64
            eps_e = int(np.clip(base + int(rng.integers(-30, 41)), -64, 63))
            eps_m = 0 if i % 4 == 1 else int(rng.integers(1, 1 << 16))
            if i == 2:
                vx[:] = 0  # all zero: eps alone, or total clamped to 1
            fields = {"x": x, "x_e": 10, "g": g, "g_e": 11, "dst": dst, "dst_e": 12, "len": n,
                      "eps_m": eps_m, "eps_e": eps_e, "kind": kind}
            out.append(Case(rng, "NORM", fields, [(x, vx), (g, _vec(rng, n))], {10: ex, 11: eg},
                            f"NORM-{isa.ENUMS['norm'][kind]}-{i}-n{n}"))
        # exponent extremes (eps 0: numerics aligns eps in int64, exact only near the data's exponent)
        for j, (ex, eg) in enumerate([(nx.EXP_MIN, nx.EXP_MIN), (nx.EXP_MAX, nx.EXP_MAX), (nx.EXP_MAX, -300),
                                      (nx.EXP_MIN, 200), (-3, nx.EXP_MIN + 2)]):
            n = [5, 17, 33, 8, 64][j]
            x = _addr(rng, 300)
            g = x + (-(-n // L) + 1) * L
            fields = {"x": x, "x_e": 10, "g": g, "g_e": 11, "dst": x, "dst_e": 12, "len": n,
                      "eps_m": 0, "eps_e": 0, "kind": kind}
            out.append(Case(rng, "NORM", fields, [(x, _vec(rng, n, KINDS[j])), (g, _vec(rng, n))], {10: ex, 11: eg},
                            f"NORM-{isa.ENUMS['norm'][kind]}-extreme{j}-n{n}"))
    return out + _norm_head_cases(rng)


def _norm_head_cases(rng):
    """RMSNorm over each head: heads of one and several chunks, a shorter last head, heads 2**12 apart in scale, a
    zero head, -2**15, one head, in place and not, eps far below and near the data; heads of 2**k elements (the mean
    square by a shift) and of 12 (by the divider)."""
    out = []
    for i, (heads, hd, kind) in enumerate([(2, 4, "random"), (3, 8, "random"), (4, 16, "small"), (1, 8, "random"),
                                           (3, 4, "max"), (2, 8, "zerohead"), (5, 8, "scaled"), (4, 16, "equal"),
                                           (3, 12, "random")]):
        n = heads * hd - (2 if i == 4 else 0)
        vx = _vec(rng, n, "random" if kind in ("zerohead", "scaled") else kind)
        if kind == "zerohead":
            vx[:hd] = 0
        if kind == "scaled":
            vx = vx // np.repeat([1, 4096, 16, 1, 256], hd)[:n]
        x = _addr(rng, 300)
        g = x + (-(-n // L) + 1) * L
        dst = x if i % 2 else g + (-(-n // L) + 1) * L
        ex, eg = int(rng.integers(-20, 6)), int(rng.integers(-20, 1))
        eps_e = int(np.clip(2 * ex - 32 + int(rng.integers(-30, 20)), -64, 63))
        fields = {"x": x, "x_e": 10, "g": g, "g_e": 11, "dst": dst, "dst_e": 12, "len": n,
                  "eps_m": int(rng.integers(1, 1 << 16)), "eps_e": eps_e, "kind": 0, "head_dim": hd}
        out.append(Case(rng, "NORM", fields, [(x, vx), (g, _vec(rng, n))], {10: ex, 11: eg},
                        f"NORM-rms-heads{i}-{heads}x{hd}"))
    return out


def _error_cases(rng):
    top = CFG.act_buffer_words
    return [
        Case(rng, "VADD", {"a": 3, "a_e": 1, "b": 4 * L, "b_e": 2, "dst": 8 * L, "dst_e": 3, "len": 8},
             [(3, _vec(rng, 8)), (4 * L, _vec(rng, 8))], {}, "err-unaligned", expect_code=Fault.UNALIGNED),
        Case(rng, "VMUL", {"a": top - L, "a_e": 1, "b": 0, "b_e": 2, "dst": L, "dst_e": 3, "len": 2 * L},
             [(top - L, _vec(rng, L))], {}, "err-bounds", expect_code=Fault.OUT_OF_RANGE),
        Case(rng, "NORM", {"x": 0, "x_e": 1, "g": L, "g_e": 2, "dst": 2 * L, "dst_e": 3, "len": 0},
             [(0, _vec(rng, 4))], {}, "err-norm-empty", expect_code=Fault.SHAPE),
        Case(rng, "NORM", {"x": 0, "x_e": 1, "g": 4 * L, "g_e": 2, "dst": 8 * L, "dst_e": 3, "len": 8, "kind": 1,
                           "head_dim": 4}, [(0, _vec(rng, 8))], {}, "err-norm-layer-heads", expect_code=Fault.SHAPE),
        Case(rng, "NORM", {"x": 0, "x_e": 1, "g": 4 * L, "g_e": 2, "dst": 8 * L, "dst_e": 3, "len": 12,
                           "head_dim": 6}, [(0, _vec(rng, 12))], {}, "err-norm-partial-chunk-heads",
             expect_code=Fault.SHAPE),
        Case(rng, "NORM", {"x": 0, "x_e": 1, "g": 80 * L, "g_e": 2, "dst": 160 * L, "dst_e": 3,
                           "len": 4 * (isa.NORM_MAX_HEADS + 1), "head_dim": 4},
             [(0, _vec(rng, 4 * (isa.NORM_MAX_HEADS + 1)))], {}, "err-norm-too-many-heads", expect_code=Fault.SHAPE),
        Case(rng, "ARGMAX", {"x": 0, "len": 0, "rd": 2}, [(0, _vec(rng, 4))], {}, "err-argmax-empty",
             expect_code=Fault.SHAPE),
        Case(rng, "ROPE", {"x": 0, "x_e": 1, "cos": 2 * L, "sin": 3 * L, "dst": 0, "heads": 2, "head_dim": 5},
             [(0, _vec(rng, 10))], {}, "err-rope-odd", expect_code=Fault.SHAPE),
        Case(rng, "VMUL", {"a": 0, "a_e": 1, "b": L, "b_e": 2, "dst": 2 * L, "dst_e": 3, "len": 4},
             [(0, np.array([32767, 1, 2, 3])), (L, np.array([32767, 1, 2, 3]))], {1: 300, 2: 300}, "err-overflow",
             expect_code=Fault.OVERFLOW),
        Case(rng, "NOP", {}, [(0, _vec(rng, 4))], {}, "err-opcode", expect_code=Fault.OPCODE),
    ]


def _all_cases():
    rng = np.random.default_rng(2026)
    return (_binary_cases(rng) + _act_cases(rng) + _argmax_cases(rng) + _rope_cases(rng) + _norm_cases(rng)
            + _error_cases(rng))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Build the tiny sim top once, run every case in one simulation; returns (cases, results)."""
    toolchain.ensure_verilator()
    cases = _all_cases()
    work = tmp_path_factory.mktemp("vector_unit")
    src = work / f"{TOP_NAME}.v"
    src.write_text(verilog.convert(VectorUnitSimTop(CFG), name=TOP_NAME))
    runner = get_runner("verilator")
    # the cases run a few thousand cycles each: C++ optimisation costs more build time than it saves
    makeflags = os.environ["MAKEFLAGS"]
    os.environ["MAKEFLAGS"] = f"{makeflags} OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0"
    try:
        runner.build(sources=[src], hdl_toplevel=TOP_NAME, build_dir=work / "build",
                     build_args=["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC"])
        prune_build(work / "build")
    finally:
        os.environ["MAKEFLAGS"] = makeflags
    spec = {"exp_bits": EREG_SHAPE.width, "result": str(work / "results.json"), "cases": [c.spec() for c in cases]}
    (work / "cases.json").write_text(json.dumps(spec))
    xml = runner.test(hdl_toplevel=TOP_NAME, test_module="cocotb_vector_unit", test_dir=TESTS,
                      build_dir=work / "build", extra_env={"VEC_CASES": str(work / "cases.json")},
                      results_xml=str(work / "results.xml"))
    _, failed = get_results(xml)
    assert failed == 0
    return cases, json.loads((work / "results.json").read_text())


def _check(case, res, cfg=CFG):
    fault = Fault(res["fault"])
    assert fault == (Fault.NONE if case.expect_code is None else case.expect_code), (case.label, fault.name)
    got = [_unpack(w, case.lanes) for w in res["words"]]
    assert got == case.exp_words, f"{case.label}: activation buffer differs"
    assert res["eregs"] == case.exp_eregs, f"{case.label}: exponent registers differ"
    assert res["regs"] == case.exp_regs, f"{case.label}: scalar registers differ"
    if case.expect_code in (Fault.UNALIGNED, Fault.OUT_OF_RANGE, Fault.SHAPE, Fault.OPCODE):
        # the decode cycle, the set-up cycle that finds the fault, then the done cycle
        assert res["cycles"] == VECTOR_SETUP_CYCLES + 1, case.label
    else:
        assert res["cycles"] == vector_cycles(case.op, case.fields, cfg), (case.label, res["cycles"])


CASE_GROUPS = ["VADD", "VMUL", "VSCALE", "ACT", "ARGMAX", "ROPE", "NORM", "err"]


@pytest.mark.parametrize("group", CASE_GROUPS)
def test_vector_unit_matches_golden(run, group):
    cases, results = run
    picked = [(c, r) for c, r in zip(cases, results) if c.label.split("-")[0] == group]
    assert picked
    for case, res in picked:
        _check(case, res)


def test_cases_cover_every_variant_and_edge():
    cases = _all_cases()
    labels = {c.label for c in cases}
    for op in VECTOR_OPS:
        assert any(lbl.startswith(op) for lbl in labels), op
    for enum, op in (("func", "ACT"), ("rope", "ROPE"), ("norm", "NORM")):
        for name in isa.ENUMS[enum]:
            assert any(lbl.startswith(f"{op}-{name}") for lbl in labels), (op, name)
    assert any(c.golden_error and c.expect_code == Fault.OVERFLOW for c in cases)
    # some error-free case underflows (result exponent clamped to EXP_MIN with nonzero input)
    assert any(not c.golden_error and c.op in ("VMUL", "VADD") and c.exp_eregs[3] == nx.EXP_MIN for c in cases)


def test_vector_cycles_rejects_other_opcodes():
    with pytest.raises(ValueError, match="GEMV"):
        vector_cycles("GEMV", {}, CFG)


def test_vector_unit_rejects_too_many_lanes():
    with pytest.raises(ValueError, match="vector_lanes=32"):
        VectorUnit(CFG.replace(vector_lanes=32))


def _amaranth_sim(cfg, cases):
    """Run *cases* on the sim top in Amaranth's simulator (no Verilator build); returns results like the cocotb run."""
    from amaranth.sim import Simulator

    dut = VectorUnitSimTop(cfg)
    results = []

    async def tb(ctx):
        ctx.set(dut.host.abuf_r.en, 1)
        for case in cases:
            spec = case.spec()
            for addr, word in spec["words"]:
                ctx.set(dut.host.abuf_w.addr, addr)
                ctx.set(dut.host.abuf_w.data, word)
                ctx.set(dut.host.abuf_w.en, (1 << len(dut.host.abuf_w.en)) - 1)
                await ctx.tick()
            ctx.set(dut.host.abuf_w.en, 0)
            for i, e in enumerate(spec["eregs"]):
                ctx.set(dut.host.ereg_w.addr, i)
                ctx.set(dut.host.ereg_w.data, e)
                ctx.set(dut.host.ereg_w.en, 1)
                await ctx.tick()
            ctx.set(dut.host.ereg_w.en, 0)
            for i, r in enumerate(spec["regs"]):
                ctx.set(dut.host.reg_w.addr, i)
                ctx.set(dut.host.reg_w.data, r)
                ctx.set(dut.host.reg_w.en, 1)
                await ctx.tick()
            ctx.set(dut.host.reg_w.en, 0)
            ctx.set(dut.cmd.payload.as_value(), spec["insn"])
            ctx.set(dut.cmd.valid, 1)
            await ctx.tick()
            ctx.set(dut.cmd.valid, 0)
            while not ctx.get(dut.done):
                await ctx.tick()
            out = {"fault": ctx.get(dut.fault.as_value())}
            await ctx.tick()
            out["cycles"] = ctx.get(dut.cycles)
            words = []
            for addr, _ in spec["words"]:
                ctx.set(dut.host.abuf_r.addr, addr)
                await ctx.tick()
                words.append(ctx.get(dut.host.abuf_r.data))
            out["words"] = words
            eregs, regs = [], []
            for i in range(len(spec["eregs"])):
                ctx.set(dut.host.ereg_r.addr, i)
                eregs.append(ctx.get(dut.host.ereg_r.data))
            for i in range(len(spec["regs"])):
                ctx.set(dut.host.reg_r.addr, i)
                regs.append(ctx.get(dut.host.reg_r.data))
            out["eregs"], out["regs"] = eregs, regs
            results.append(out)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return results


def _small_config_cases(rng, cfg):
    lanes = abuf_lanes(cfg)
    V = cfg.vector_lanes
    w = max(2 * lanes, 8 * V)  # vector slots, at least two buffer words apart
    return [
        Case(rng, "VADD", {"a": 0, "a_e": 1, "b": 4 * w, "b_e": 2, "dst": 8 * w, "dst_e": 3, "len": 7},
             [(0, _vec(rng, 7)), (4 * w, _vec(rng, 7))], {1: -5, 2: -9}, "cfg-VADD", cfg=cfg),
        Case(rng, "ACT", {"x": 4 * w, "x_e": 1, "dst": 4 * w, "dst_e": 3, "len": 9, "func": 2},
             [(4 * w, _vec(rng, 9))], {1: -12}, "cfg-ACT", cfg=cfg),
        Case(rng, "ARGMAX", {"x": 8 * w, "len": 6, "rd": 5}, [(8 * w, np.array([3, 9, -2, 9, 9, 1]))], {},
             "cfg-ARGMAX", cfg=cfg),
        Case(rng, "ROPE", {"x": 0, "x_e": 1, "cos": 5 * w + 1, "cos_e": 2, "sin": 5 * w + 4, "sin_e": 4, "dst": 2 * w + 3,
                           "dst_e": 3, "heads": 2, "head_dim": 6, "mode": 0},
             [(0, _vec(rng, 12)), (5 * w + 1, _vec(rng, 3)), (5 * w + 4, _vec(rng, 3))], {1: -3, 2: -15, 4: -14},
             "cfg-ROPE", cfg=cfg),
        Case(rng, "NORM", {"x": 0, "x_e": 1, "g": 4 * w, "g_e": 2, "dst": 0, "dst_e": 3, "len": 5, "eps_m": 5000,
                           "eps_e": -40, "kind": 1},
             [(0, _vec(rng, 5)), (4 * w, _vec(rng, 5))], {1: -8, 2: -14}, "cfg-NORM", cfg=cfg),
        # three heads of two chunks, the first far below the others: chunks walked from each head's first
        Case(rng, "NORM", {"x": 0, "x_e": 1, "g": 4 * w, "g_e": 2, "dst": 8 * w, "dst_e": 3, "len": 6 * V,
                           "eps_m": 5000, "eps_e": -40, "kind": 0, "head_dim": 2 * V},
             [(0, _vec(rng, 6 * V) // np.repeat([64, 1, 1], 2 * V)), (4 * w, _vec(rng, 6 * V))], {1: -8, 2: -14},
             "cfg-NORM-heads", cfg=cfg),
    ]


@pytest.mark.parametrize("changes", [{"port_bits": 32}, {"vector_lanes": 1}, {"vector_lanes": 16},
                                     {"norm_heads": False},
                                     {k: getattr(PRESETS["ulx3s"], k) for k in ("port_bits", "vector_lanes",
                                                                                 "norm_heads")}],
                         ids=["8-lane-words", "1-lane", "lanes-eq-word", "no-norm-heads", "ulx3s-lanes"])
def test_other_lane_geometries_in_amaranth_sim(changes):
    """Word and lane ratios other than tiny's (one chunk per word, one lane per chunk), without a Verilator build;
    and a unit built without NORM over each head (ulx3s's): the whole-vector NORMs as before, the heads' a fault."""
    cfg = CFG.replace(**changes)
    rng = np.random.default_rng(7)
    cases = _small_config_cases(rng, cfg)
    assert [c.label for c in cases if c.expect_code == Fault.SHAPE] == ([] if cfg.norm_heads else ["cfg-NORM-heads"])
    for case, res in zip(cases, _amaranth_sim(cfg, cases)):
        _check(case, res, cfg)


def test_vadd_alignment_in_amaranth_sim():
    """VADD's smaller operand aligned on the lane multiplier, at every exponent distance that selects a different
    path (equal exponents, left by up to GUARD - 1, right by 1 to GUARD with round-half-up ties, beyond), either
    operand the smaller."""
    rng = np.random.default_rng(12)
    cases = []
    for i, d in enumerate([0, 1, 2, 15, 16, 17, 18, 31, 32, 33, 34, 40, 100]):
        for a_small in (False, True):
            ea = int(rng.integers(-30, 0))
            eb = ea - d if not a_small else ea + d
            n = [5, 8][i % 2]
            va, vb = _vec(rng, n), _vec(rng, n)
            if i % 3 == 0:  # halves: ties of the right shift
                vb[: n // 2] = -(1 << 14) + np.arange(n // 2) * (1 << 13)
                va[: n // 2] = -(1 << 14) + np.arange(n // 2) * (1 << 13)
            if i % 2 == 0:  # the larger operand 0: the sum is the aligned operand alone, normalized from its last bit
                (vb if a_small else va)[:] = 0
            fields = {"a": 0, "a_e": 1, "b": 4 * L, "b_e": 2, "dst": 8 * L, "dst_e": 3, "len": n}
            cases.append(Case(rng, "VADD", fields, [(0, va), (4 * L, vb)], {1: ea, 2: eb}, f"VADD-d{d}-{a_small}"))
    for case, res in zip(cases, _amaranth_sim(CFG, cases)):
        _check(case, res)


def test_norm_eps_shifts_in_amaranth_sim():
    """NORM's eps aligned by -40 to 180 bits against the mean square (numerics computes it exactly): the staged
    scalar rounding around its window (total bit lengths near SCALAR_BITS + k * NORM_SCALAR_STEP) and eps shifts
    around the cap that folds them into the exponent."""
    rng = np.random.default_rng(11)
    cases = []
    shifts = [-40, -17, -1, 0, 1, 15, 16, 17, 33, 40, 47, 48, 63, 64, 79, 80, 86, 87, 88, 95, 120, 180]
    for i, shift in enumerate(shifts):
        kind = i % len(isa.ENUMS["norm"])
        n = [3, 8, 5, 9][i % 4]
        eps_e = int(rng.integers(-60, 60))
        eps_e += (eps_e - shift) % 2  # the data's exponent from eps_e - shift = 2 * ex - NORM_MS_FRAC
        ex = (eps_e - shift + nx.NORM_MS_FRAC) // 2
        vx = _vec(rng, n, KINDS[i % len(KINDS)])
        if i % 5 == 4:
            vx[:] = 0  # eps alone
        eps_m = int(rng.integers(1, 1 << 16)) if i % 3 else (1 << 16) - 1
        fields = {"x": 0, "x_e": 10, "g": 4 * L, "g_e": 11, "dst": 0, "dst_e": 12, "len": n, "eps_m": eps_m,
                  "eps_e": eps_e, "kind": kind}
        cases.append(Case(rng, "NORM", fields, [(0, vx), (4 * L, _vec(rng, n))], {10: ex, 11: -14},
                          f"NORM-eps{shift}"))
    assert not any(c.golden_error for c in cases)
    for case, res in zip(cases, _amaranth_sim(CFG, cases)):
        _check(case, res)


@pytest.mark.parametrize("op,fields", [("VADD", {"a": 0, "b": 4 * L, "dst": 8 * L, "len": 9}),
                                       ("ARGMAX", {"x": 0, "len": 9, "rd": 1}),
                                       ("VMUL", {"a": 3, "b": 0, "dst": 0, "len": 4})],
                         ids=["VADD", "ARGMAX", "set-up-fault"])
def test_unit_protocol(op, fields):
    """The one unit protocol: ``cmd.ready`` exactly while not busy; ``busy`` from the cycle after the transfer up to
    and including the one ``done`` cycle; the busy window is the instruction's cycle count (VECTOR_SETUP_CYCLES + 1 for a set-up fault)."""
    from amaranth.sim import Simulator

    dut = VectorUnitSimTop(CFG)
    ins = isa.Instr(op, {f.name: fields.get(f.name, 0) for f in isa.BY_NAME[op].fields})
    trace = []

    async def tb(ctx):
        ctx.set(dut.cmd.payload.as_value(), isa.encode(ins))
        ctx.set(dut.cmd.valid, 1)
        while not ctx.get(dut.cmd.ready):
            await ctx.tick()
        await ctx.tick()  # the transfer
        ctx.set(dut.cmd.valid, 0)
        for _ in range(vector_cycles(op, fields, CFG) + 3):
            trace.append((ctx.get(dut.busy), ctx.get(dut.cmd.ready), ctx.get(dut.done)))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert all(ready == (not busy) for busy, ready, _ in trace)
    busy = [b for b, _, _ in trace]
    window = busy.index(0)
    assert busy[0] == 1 and not any(busy[window:]), busy
    assert [d for _, _, d in trace] == [0] * (window - 1) + [1] + [0] * (len(trace) - window)
    assert window == (VECTOR_SETUP_CYCLES + 1 if op == "VMUL" else vector_cycles(op, fields, CFG))
