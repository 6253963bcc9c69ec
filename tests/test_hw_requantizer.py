"""The requantizer that the REQ and LDROW units share, in Amaranth's simulator: bit-exact with
numerics.normalize, packed into activation-buffer words with lane masks, busy for exactly 2 * len +
timing.REQUANT_OVERHEAD cycles (2 when empty), and 2 * (latency - 1) + registered more as LDROW and REQ build it (values
arriving 3 or 2 cycles after their read, one or two registers in the round pass)."""

import numpy as np
import pytest

pytest.importorskip("amaranth")

from amaranth.sim import Simulator
from kvoverlay.hw.ports import Fault
from kvoverlay.hw.requantizer import Requantizer

from kvoverlay import numerics as nx
from kvoverlay import timing
from kvoverlay.config import PRESETS

CFG = PRESETS["tiny"]
LANES = CFG.abuf_lanes


def run(values, exp, width, dst_word=3, latency=1, registered=False, peak=None, lanes=1, wide=False):
    """Requantize *values* (one read per cycle, each value *latency* cycles after its read; with *peak*, a fold
    command that takes it as the OR of their magnitudes; built with *lanes*, a read takes *lanes* values when the
    command is *wide*, else one on lane 0); returns (buffer words written, exponent, fault, cycles from the command
    to done)."""
    dut = Requantizer(CFG, width, latency=latency, registered=registered, lanes=lanes)
    words, result = {}, {}
    junk = 0x5A5A5A5A - (1 << (width - 1)) if width > 32 else -1
    mask = (1 << width) - 1

    def lane_values(index):
        """What the reading unit puts on the lanes for a read of *index*: the values there, junk past them (a wide
        read's row runs past len) and on the lanes a read that is not wide leaves."""
        got = [int(values[index + i]) if (i == 0 or wide) and index + i < len(values) else junk
               for i in range(lanes)]
        return sum((v & mask) << (width * i) for i, v in enumerate(got))

    async def tb(ctx):
        ctx.set(dut.cmd.payload.len, len(values))
        ctx.set(dut.cmd.payload.exp, exp)
        ctx.set(dut.cmd.payload.dst, dst_word)
        ctx.set(dut.cmd.payload.fold, peak is not None)
        if lanes > 1:
            ctx.set(dut.cmd.payload.wide, wide)
        ctx.set(dut.peak, peak or 0)
        ctx.set(dut.cmd.valid, 1)
        await ctx.tick()
        ctx.set(dut.cmd.valid, 0)
        cycles, pending = 0, [None] * latency
        while True:
            if pending[0] is not None:  # the value read latency cycles ago
                ctx.set(dut.value.as_value() if lanes > 1 else dut.value,
                        lane_values(pending[0]) if lanes > 1 else int(values[pending[0]]))
            else:  # nothing may be taken from a cycle without a value in flight
                ctx.set(dut.value.as_value() if lanes > 1 else dut.value,
                        sum((junk & mask) << (width * i) for i in range(lanes)) if lanes > 1 else junk)
            cycles += 1
            pending = pending[1:] + [ctx.get(dut.index) if ctx.get(dut.read) else None]
            en = ctx.get(dut.abuf_w.en)
            if en:
                data, addr = ctx.get(dut.abuf_w.data), ctx.get(dut.abuf_w.addr)
                old = words.get(addr, [None] * LANES)
                words[addr] = [(data >> (16 * i)) & 0xFFFF if en >> i & 1 else old[i] for i in range(LANES)]
            if ctx.get(dut.done.valid):
                result.update(exp=ctx.get(dut.exp), fault=Fault(ctx.get(dut.done.payload)), cycles=cycles)
                return
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return words, result["exp"], result["fault"], result["cycles"]


@pytest.mark.parametrize("n, width, lo, exp", [(37, 64, 1 << 50, -60), (16, 34, 1 << 32, 3), (5, 64, 1 << 10, -500),
                                                (1, 34, 40, 0), (20, 64, 0, 7)],
                         ids=["wide", "ldrow-width", "underflow", "one", "zeros"])
def test_bit_exact_with_normalize(n, width, lo, exp):
    rng = np.random.default_rng(n + width)
    values = rng.integers(-lo, lo + 1, n) if lo else np.zeros(n, np.int64)
    want_m, want_e = nx.normalize(values, exp)
    words, got_e, fault, cycles = run(values, exp, width)
    assert fault == Fault.NONE and got_e == want_e
    got = [words[3 + i // LANES][i % LANES] for i in range(n)]
    assert [np.int16(np.uint16(v)) for v in got] == [int(v) for v in want_m]
    assert all(v is None for v in words[3 + (n - 1) // LANES][(n - 1) % LANES + 1:])  # the lane mask
    assert sorted(words) == list(range(3, 3 + -(-n // LANES)))
    assert cycles == 2 * n + timing.REQUANT_OVERHEAD


@pytest.mark.parametrize("n, width, lo, exp", [(37, 33, 1 << 32, -20), (5, 33, 1 << 10, -500), (1, 33, 40, 0),
                                                (20, 33, 0, 7)], ids=["ldrow", "underflow", "one", "zeros"])
def test_ldrow_pipeline(n, width, lo, exp):
    """LDROW's build: values three cycles after their read, the round-shift registered before the clip."""
    rng = np.random.default_rng(n + width)
    values = rng.integers(-lo, lo + 1, n) if lo else np.zeros(n, np.int64)
    want_m, want_e = nx.normalize(values, exp)
    words, got_e, fault, cycles = run(values, exp, width, latency=3, registered=True)
    assert fault == Fault.NONE and got_e == want_e
    got = [words[3 + i // LANES][i % LANES] for i in range(n)]
    assert [np.int16(np.uint16(v)) for v in got] == [int(v) for v in want_m]
    assert sorted(words) == list(range(3, 3 + -(-n // LANES)))
    assert cycles == 2 * n + timing.REQUANT_OVERHEAD + 2 * (3 - 1) + 1


@pytest.mark.parametrize("values, exp", [([2**63 - 1, -(2**63 - 1), 2**62 + 12345, -5, 2**63 - 2**47], -60),
                                         ([2**40 + 7, -(2**40), 3, 2**39 - 1] * 5, -80), ([1, -2, 0], 0),
                                         ([5, -(2**50), 2**49 + 3, -7, 2**50 - 1, 9, 11, -13, 2**48, 1, 2], -70)],
                         ids=["int64-wrap", "underflow", "small", "eleven"])
@pytest.mark.parametrize("wide", [True, False], ids=["row-per-cycle", "word-per-cycle"])
def test_req_pipeline(values, exp, wide):
    """REQ's build: accumulator words two cycles after their read, ``acc_lanes`` at a time (a REQ from the start of
    an accumulator row: lengths that are not a multiple of them leave lanes of the last row out) or one at a time
    (from any other word), the round-shift registered before the clip and the mantissa before the packer; the
    round half up of a 63-bit peak wraps as numpy's int64 does."""
    values = np.array(values, np.int64)
    want_m, want_e = nx.normalize(values, exp)
    words, got_e, fault, cycles = run(values, exp, 64, latency=timing.REQ_READ_LATENCY,
                                      registered=timing.REQ_ROUND_REGISTERS, lanes=CFG.acc_lanes, wide=wide)
    assert fault == Fault.NONE and got_e == want_e
    n = len(values)
    got = [words[3 + i // LANES][i % LANES] for i in range(n)]
    assert [np.int16(np.uint16(v)) for v in got] == [int(v) for v in want_m]
    assert all(v is None for v in words[3 + (n - 1) // LANES][(n - 1) % LANES + 1:])  # the lane mask
    # less the check cycle, which is the REQ unit's; an accumulator that starts a row, or one that does not
    assert cycles == timing.req_cycles(CFG, n, acc=0 if wide else 1) - 1


@pytest.mark.parametrize("values, exp", [([2**63 - 1, -(2**63 - 1), 2**62 + 12345, -5], -60),
                                         ([2**40 + 7, -(2**40), 3, 2**39 - 1] * 5, -80), ([-(2**20)] * 3 + [2**19], 0),
                                         ([0] * 6, 4), ([3, -2**30, 7, 2**29 + 1, -1, 5, 2**30 - 1], -9)],
                         ids=["int64-wrap", "underflow", "negative-power", "zeros", "seven"])
@pytest.mark.parametrize("wide", [True, False], ids=["row-per-cycle", "word-per-cycle"])
def test_req_fold(values, exp, wide):
    """REQ's build with a folded peak (the GEMV unit's record: the OR of the magnitudes): the round pass alone,
    bit-exact, a pass and REQ_READ_LATENCY cycles fewer (timing.req_cycles with fold)."""
    values = np.array(values, np.int64)
    want_m, want_e = nx.normalize(values, exp)
    peak = 0
    for v in values:
        peak |= abs(int(v))
    words, got_e, fault, cycles = run(values, exp, 64, latency=timing.REQ_READ_LATENCY,
                                      registered=timing.REQ_ROUND_REGISTERS, peak=peak, lanes=CFG.acc_lanes, wide=wide)
    assert fault == Fault.NONE and got_e == want_e
    n = len(values)
    got = [words[3 + i // LANES][i % LANES] for i in range(n)]
    assert [np.int16(np.uint16(v)) for v in got] == [int(v) for v in want_m]
    acc, reads = (0, -(-n // CFG.acc_lanes)) if wide else (1, n)
    assert cycles == timing.req_cycles(CFG, n, fold=1, acc=acc) - 1 == \
        timing.req_cycles(CFG, n, acc=acc) - 1 - reads - timing.REQ_READ_LATENCY


def test_latency_and_registers_checked():
    with pytest.raises(ValueError, match="latency=0"):
        Requantizer(CFG, 33, latency=0)
    with pytest.raises(ValueError, match="registered=3"):
        Requantizer(CFG, 64, registered=3)


def test_overflow_writes_nothing():
    values = np.full(4, 1 << 40)
    with pytest.raises(nx.NumericsError):
        nx.normalize(values, nx.EXP_MAX)
    words, _, fault, cycles = run(values, nx.EXP_MAX, 64)
    assert fault == Fault.OVERFLOW and not words and cycles == 4 + timing.REQUANT_OVERHEAD - 1


def test_empty_vector():
    words, exp, fault, cycles = run([], 12, 64)
    assert (fault, exp, words, cycles) == (Fault.NONE, nx.EXP_MIN, {}, 2)
