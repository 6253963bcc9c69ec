"""The SDRAM controller, its width adapter and the checking model, in Amaranth's simulator."""

import random

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator
from kvoverlay.boards.sdram import SdramCmd, SdramController, SdramError, SdramMemory, SdramModel, SdramTiming, sdram_timing

from kvoverlay.config import preset

#: Slow enough that every rule spans several cycles, short init and refresh interval, a small part.
SLOW = SdramTiming(cl=2, t_rcd=3, t_rp=3, t_rc=12, t_ras=5, t_wr=2, t_rfc=6, t_rrd=2, t_mrd=2, refi=120, init=12,
                   col_bits=4, row_bits=3, bank_bits=2)


def _run(dut, tb, vcd=None):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()


def _pair(timing, len_bits=12):
    m = Module()
    m.submodules.ctl = ctl = SdramController(timing, len_bits)
    m.submodules.model = model = SdramModel(timing, 1 << timing.addr_bits)
    wiring.connect(m, ctl.pins, model.pins)
    return m, ctl, model


async def _stream_burst(ctx, req, wr, rd, addr, length, writes=None):
    """One burst on a request/write/read stream triple (the controller's or the overlay's port): *writes* (payload
    fields per word) or a read of *length*; returns the words read and the cycles from the request's acceptance."""
    ctx.set(req.payload.addr, addr)
    ctx.set(req.payload.len, length)
    ctx.set(req.payload.write, writes is not None)
    ctx.set(req.valid, 1)
    await ctx.tick().until(req.ready)
    ctx.set(req.valid, 0)
    got, cycles = [], 0
    for fields in writes or ():
        for name, value in fields.items():
            ctx.set(getattr(wr.payload, name), value)
        ctx.set(wr.valid, 1)
        await ctx.tick().until(wr.ready)
    ctx.set(wr.valid, 0)
    while writes is None and len(got) < length:
        await ctx.tick()
        cycles += 1
        if ctx.get(rd.valid):
            got.append(ctx.get(rd.payload))
    return got, cycles


async def _burst(ctx, ctl, addr, words=None, length=None):
    """One write (*words*: (data, mask)) or read (*length* words) burst through the controller; the words read."""
    writes = None if words is None else [{"data": w, "mask": mask} for w, mask in words]
    got, _ = await _stream_burst(ctx, ctl.cmd, ctl.wdata, ctl.rdata, addr, length if words is None else len(words),
                                 writes)
    return got


@pytest.mark.parametrize("timing", [SLOW, sdram_timing(50.0, init=40, refi=300, row_bits=3, col_bits=5),
                                    sdram_timing(133.0, init=40, refi=300, row_bits=3, col_bits=5)],
                         ids=["slow", "50MHz", "133MHz"])
def test_random_bursts_read_back_under_refresh(timing):
    """Random write bursts (with byte masks) and read-backs across rows and banks; refresh keeps its period under
    load and the model sees no violation."""
    dut, ctl, model = _pair(timing)
    rng = random.Random(timing.cl * 1000 + timing.t_rcd)
    size = 1 << timing.addr_bits
    shadow = [None] * size
    cycles = {}

    async def tb(ctx):
        await ctx.tick().until(ctl.ready)
        assert ctx.get(model.error) == SdramError.NONE
        start = ctx.get(model.reads) + ctx.get(model.writes)
        for _ in range(30):
            addr = rng.randrange(size)
            n = min(rng.randrange(1, 3 << timing.col_bits), size - addr)
            words = [(rng.randrange(1 << 16), rng.choice([0, 0, 0, 1, 2])) for _ in range(n)]
            await _burst(ctx, ctl, addr, words)
            for i, (w, mask) in enumerate(words):
                old = shadow[addr + i] or 0
                keep = (0xFF if mask & 1 else 0) | (0xFF00 if mask & 2 else 0)
                shadow[addr + i] = (old & keep) | (w & ~keep & 0xFFFF) if shadow[addr + i] is not None or mask == 0 \
                    else None
            # read back a random span that overlaps what was written
            first = max(0, addr - rng.randrange(4))
            span = min(n + rng.randrange(4), size - first)
            got = await _burst(ctx, ctl, first, length=span)
            for i, g in enumerate(got):
                if shadow[first + i] is not None:
                    assert g == shadow[first + i], (first + i, hex(g), hex(shadow[first + i]))
        cycles["refreshes"] = ctx.get(model.refs)
        cycles["accesses"] = ctx.get(model.reads) + ctx.get(model.writes) - start
        assert ctx.get(model.error) == SdramError.NONE, (ctx.get(model.error), ctx.get(model.error_cycle))

    _run(dut, tb)
    assert cycles["refreshes"] >= 3


async def _cmd(ctx, pins, cmd, a=0, ba=0, dq_oe=0):
    ctx.set(pins.cs_n, 0)
    ctx.set(pins.ras_n, cmd.value >> 2 & 1)
    ctx.set(pins.cas_n, cmd.value >> 1 & 1)
    ctx.set(pins.we_n, cmd.value & 1)
    ctx.set(pins.a, a)
    ctx.set(pins.ba, ba)
    ctx.set(pins.dq_oe, dq_oe)
    await ctx.tick()
    ctx.set(pins.cs_n, 1)
    ctx.set(pins.dq_oe, 0)


async def _nop(ctx, cycles):
    await ctx.tick().repeat(cycles) if cycles else None


async def _init(ctx, pins, t):
    await _nop(ctx, t.init + 1)
    await _cmd(ctx, pins, SdramCmd.PRE, a=1 << 10)
    await _nop(ctx, t.t_rp)
    for _ in range(2):
        await _cmd(ctx, pins, SdramCmd.REF)
        await _nop(ctx, t.t_rfc)
    await _cmd(ctx, pins, SdramCmd.MRS, a=t.cl << 4)
    await _nop(ctx, t.t_mrd)


# Each sequence breaks one rule once the part is initialised (by the part's rules, with waits one cycle short).
VIOLATIONS = {
    SdramError.INIT: lambda t: [("raw", SdramCmd.PRE, 1 << 10, 0)],
    SdramError.T_RCD: lambda t: [(SdramCmd.ACT, 1, 0), (t.t_rcd - 2,), (SdramCmd.READ, 0, 0)],
    SdramError.T_RP: lambda t: [(SdramCmd.ACT, 1, 0), (t.t_rc,), (SdramCmd.PRE, 0, 0), (t.t_rp - 2,),
                                (SdramCmd.ACT, 2, 0)],
    SdramError.T_RC: lambda t: [(SdramCmd.ACT, 1, 0), (t.t_ras,), (SdramCmd.PRE, 0, 0), (t.t_rp,),
                                (SdramCmd.ACT, 2, 0)],
    SdramError.REFRESH: lambda t: [(t.refi + 2,)],
    SdramError.CLOSED: lambda t: [(SdramCmd.READ, 0, 1)],
    SdramError.T_RAS: lambda t: [(SdramCmd.ACT, 1, 0), (t.t_ras - 2,), (SdramCmd.PRE, 0, 0)],
    SdramError.T_WR: lambda t: [(SdramCmd.ACT, 1, 0), (t.t_ras,), (SdramCmd.WRITE, 0, 0), (SdramCmd.PRE, 0, 0)],
    SdramError.ACT_OPEN: lambda t: [(SdramCmd.ACT, 1, 0), (t.t_rc,), (SdramCmd.ACT, 1, 0)],
    SdramError.REF_OPEN: lambda t: [(SdramCmd.ACT, 1, 3), (t.t_rc,), (SdramCmd.REF, 0, 0)],
    SdramError.T_RRD: lambda t: [(SdramCmd.ACT, 1, 0), (SdramCmd.ACT, 1, 1)],
    SdramError.MODE: lambda t: [(SdramCmd.MRS, 3 << 4, 0)],
    SdramError.T_MRD: lambda t: [(SdramCmd.PRE, 1 << 10, 0), (t.t_rp,), (SdramCmd.MRS, t.cl << 4, 0),
                                 (SdramCmd.ACT, 0, 0)],
    SdramError.BUS: lambda t: [(SdramCmd.ACT, 1, 0), (t.t_rcd,), (SdramCmd.READ, 0, 0), (t.cl - 2,), ("oe",)],
}


def test_every_error_has_a_violation():
    assert set(VIOLATIONS) == set(SdramError) - {SdramError.NONE}


@pytest.mark.parametrize("error", list(VIOLATIONS), ids=lambda e: e.name)
def test_model_catches_violation(error):
    """The model flags each rule when broken, and the same part accepts the legal init before it."""
    t = SLOW
    model = SdramModel(t, 1 << t.addr_bits)
    seen = {}

    async def tb(ctx):
        p = model.pins
        steps = VIOLATIONS[error](t)
        if steps[0][0] != "raw":
            await _init(ctx, p, t)
            seen["after_init"] = ctx.get(model.error)
        for step in steps:
            if step[0] == "raw":
                await _cmd(ctx, p, step[1], a=step[2], ba=step[3])
            elif step[0] == "oe":
                ctx.set(p.dq_oe, 1)
                await ctx.tick()
                ctx.set(p.dq_oe, 0)
            elif len(step) == 1:
                await _nop(ctx, step[0])
            else:
                await _cmd(ctx, p, step[0], a=step[1], ba=step[2])
        await ctx.tick()
        seen["error"] = ctx.get(model.error)

    _run(model, tb)
    assert seen.get("after_init", SdramError.NONE) == SdramError.NONE
    assert seen["error"] == error


def _memory(port_bits=64, mem_bytes=1 << 12, timing=None):
    cfg = preset("tiny").replace(port_bits=port_bits) if port_bits != 64 else preset("tiny")
    timing = timing or sdram_timing(cfg.clock_mhz, init=30, refi=400, row_bits=4, col_bits=5)
    depth = mem_bytes // cfg.port_bytes
    m = Module()
    m.submodules.mem = mem = SdramMemory(cfg, depth, timing)
    m.submodules.model = model = SdramModel(timing, depth * (cfg.port_bits // 16))
    wiring.connect(m, mem.pins, model.pins)
    return m, mem, model, cfg, depth


async def _port_burst(ctx, port, addr, beats=None, length=None, strb=None):
    writes = None if beats is None else [{"data": b, "strb": strb[i] if strb else -1} for i, b in enumerate(beats)]
    got, _ = await _stream_burst(ctx, port.req, port.wr, port.rd, addr, length if beats is None else len(beats),
                                 writes)
    return got


@pytest.mark.parametrize("port_bits", [64, 256])
def test_memory_port_bursts_host_and_instruction_window(port_bits):
    """Overlay bursts with byte strobes read back; the host's stalled one-word writes and reads see the same
    memory; host writes into the top window reach the instruction fetch (half an instruction per 64-bit word, two
    per 256-bit word); an aborted write burst frees the port."""
    dut, mem, model, cfg, depth = _memory(port_bits)
    pb = cfg.port_bytes
    rng = random.Random(7)
    shadow = [0] * depth

    async def tb(ctx):
        await ctx.tick().until(mem.ready)
        for _ in range(12 if port_bits == 64 else 3):  # a wide word is 16 SDRAM words: fewer bursts
            addr = rng.randrange(depth - 8)
            n = rng.randrange(1, min(40, depth - addr))
            beats = [rng.getrandbits(cfg.port_bits) for _ in range(n)]
            strb = [rng.choice([(1 << pb) - 1, rng.getrandbits(pb)]) for _ in range(n)]
            await _port_burst(ctx, mem.port, addr, beats, strb=strb)
            for i, (b, s) in enumerate(zip(beats, strb)):
                mask = sum(0xFF << 8 * k for k in range(pb) if s >> k & 1)
                shadow[addr + i] = (shadow[addr + i] & ~mask) | (b & mask)
            first = max(0, addr - 2)
            got = await _port_burst(ctx, mem.port, first, length=min(n + 4, depth - first))
            assert got == shadow[first:first + len(got)]
        # the host: one word at a time, waiting on stall
        ctx.set(mem.host_sel, 1)
        window = depth - mem.window
        words = {depth - 1: rng.getrandbits(cfg.port_bits), window: rng.getrandbits(cfg.port_bits), 5: 0x1234}
        for a, w in words.items():
            ctx.set(mem.host.addr, a)
            ctx.set(mem.host.wdata, w)
            ctx.set(mem.host.we, 1)
            await ctx.tick().until(~mem.host.stall)
            ctx.set(mem.host.we, 0)
            shadow[a] = w
        for a in (depth - 1, window, 5, 6):
            ctx.set(mem.host.addr, a)
            ctx.set(mem.host.re, 1)
            await ctx.tick().until(~mem.host.stall)
            ctx.set(mem.host.re, 0)
            await ctx.tick().until(~mem.host.stall)
            assert ctx.get(mem.host.rdata) == shadow[a], a
        # the instructions that the window's first port word holds (64-bit port: the low half of one)
        for j in range(max(1, cfg.port_bits // 128)):
            ctx.set(mem.insn_addr, (window * pb) // 16 + j)
            await ctx.tick()
            word = ctx.get(mem.insn_data)
            width = min(128, cfg.port_bits)
            assert word & ((1 << width) - 1) == shadow[window] >> 128 * j & ((1 << width) - 1), j
        # an aborted write burst: two of eight beats given, then the overlay's reset
        ctx.set(mem.host_sel, 0)
        ctx.set(mem.port.req.payload.addr, 16)
        ctx.set(mem.port.req.payload.len, 8)
        ctx.set(mem.port.req.payload.write, 1)
        ctx.set(mem.port.req.valid, 1)
        await ctx.tick().until(mem.port.req.ready)
        ctx.set(mem.port.req.valid, 0)
        for _ in range(2):
            ctx.set(mem.port.wr.payload.data, (1 << cfg.port_bits) - 1)
            ctx.set(mem.port.wr.payload.strb, -1)
            ctx.set(mem.port.wr.valid, 1)
            await ctx.tick().until(mem.port.wr.ready)
        ctx.set(mem.port.wr.valid, 0)
        ctx.set(mem.abort, 1)
        await ctx.tick().repeat(2)
        ctx.set(mem.abort, 0)
        got = await _port_burst(ctx, mem.port, 16, length=8)
        assert got == [(1 << cfg.port_bits) - 1] * 2 + shadow[18:24]
        assert ctx.get(model.error) == SdramError.NONE, (ctx.get(model.error), ctx.get(model.error_cycle))

    _run(dut, tb)


def test_stream_rate_is_the_rooflines_figure():
    """A long sequential read (a GEMV's weight stream) at the ulx3s preset's 50 MHz timing, the part's geometry:
    the bytes per cycle the roofline uses for an SDRAM board, within 1 %, under the bus's 2."""
    from kvoverlay.roofline import SDRAM_STREAM_BYTES_PER_CYCLE

    dut, mem, model, cfg, _ = _memory(mem_bytes=1 << 16, timing=sdram_timing(50.0, init=30))
    words = 2048
    seen = {}

    async def tb(ctx):
        await ctx.tick().until(mem.ready)
        _, seen["cycles"] = await _stream_burst(ctx, mem.port.req, mem.port.wr, mem.port.rd, 0, words)
        seen["error"] = ctx.get(model.error)

    _run(dut, tb)
    rate = words * cfg.port_bytes / seen["cycles"]
    assert seen["error"] == SdramError.NONE
    assert SDRAM_STREAM_BYTES_PER_CYCLE <= rate < min(2.0, SDRAM_STREAM_BYTES_PER_CYCLE * 1.01), rate
