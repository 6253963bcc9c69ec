"""The board top's UART host bridge in Amaranth's simulator: real UART waveforms on the pins, protocol frames from
:mod:`kvoverlay.link`, the link-only build (bridge + block RAM, no overlay) so that each case runs in seconds."""

import random

import pytest
from amaranth.sim import Simulator
from kvoverlay.boards.bridge import SlipFramer
from kvoverlay.boards.sdram import SdramError, sdram_timing
from kvoverlay.boards.top import BoardTop

from kvoverlay import link
from kvoverlay.config import PRESETS

DIV = 4
CFG = PRESETS["tiny"]


def uart_wave(data: bytes) -> list:
    """The line level per clock cycle for *data*: start bit, 8 data bits least significant first, stop bit."""
    return [bit for byte in data for bit in [0, *((byte >> i) & 1 for i in range(8)), 1] for _ in range(DIV)]


def uart_decode(wave: list) -> bytes:
    """The bytes on a line sampled once per clock cycle: each bit read in its middle, stop bit checked."""
    out, t = bytearray(), 0
    while t < len(wave):
        if wave[t]:
            t += 1
            continue
        mid = t + DIV // 2
        bits = [wave[mid + DIV * (i + 1)] for i in range(9)]
        assert bits[8] == 1, f"framing error at cycle {t}"
        out.append(sum(b << i for i, b in enumerate(bits[:8])))
        t = mid + DIV * 9
    return bytes(out)


#: The link-only top on SDRAM: the controller and the checking model, with the part's timing but a short power-up.
SDRAM = {"memory": "sdram", "sdram_model": True, "sdram_timing": sdram_timing(CFG.clock_mhz, init=64)}


def run_bridge(requests, *, overlay=False, mem_bytes=4096, quiet_bits=60, **memory):
    """Drive each request's bytes on ``rx`` and sample ``tx`` every cycle, until ``tx`` has been quiet a while
    (*memory*: :class:`BoardTop`'s memory options; an SDRAM model's violation fails the run)."""
    top = BoardTop(CFG, mem_bytes=mem_bytes, divisor=DIV, overlay=overlay, **memory)
    sim = Simulator(top)
    sim.add_clock(1e-8)
    sampled, errors = [], []

    async def host(ctx):
        # half duplex, as the host client: each request after the last reply has ended
        for data in [b"", *requests]:
            wave = uart_wave(data)
            quiet = 0
            for t in range(10**7):
                ctx.set(top.rx, wave[t] if t < len(wave) else 1)
                _, _, tx = await ctx.tick().sample(top.tx)
                sampled.append(tx)
                quiet = quiet + 1 if tx and t >= len(wave) else 0
                if t >= len(wave) and quiet > DIV * quiet_bits:
                    break
        if top.sdram_model and ctx.get(top.sdram_error) != SdramError.NONE:
            errors.append(ctx.get(top.sdram_error))

    sim.add_testbench(host)
    sim.run()
    assert not errors, errors
    return uart_decode(sampled)


def replies(raw: bytes) -> list:
    """The frames in *raw*, unescaped, CRC checked (a bad one is an assertion: the bridge never sends one)."""
    out = []
    for chunk in raw.split(bytes([link.END])):
        if chunk:
            body = link.slip_decode(chunk)
            assert body is not None and link.crc16(body) == 0, chunk
            out.append(body[:-2])
    return out


def request(seq, cmd, args=b""):
    return link.frame(bytes([seq, cmd]) + args)


def test_crc_matches_hardware_reply_and_info():
    (info,) = replies(run_bridge([request(7, link.Cmd.INFO)]))
    assert info[:2] == bytes([7, link.Status.OK])
    version, flags, port_bits, words, fingerprint, dropped = __import__("struct").unpack("<BBHIIH", info[2:])
    assert (version, flags, port_bits, words, fingerprint, dropped) == (link.LINK_VERSION, 0, CFG.port_bits,
                                                                         4096 // CFG.port_bytes, 0, 0)


@pytest.mark.parametrize("memory", [{}, SDRAM], ids=["bram", "sdram"])
def test_write_then_read_memory_with_escapes(memory):
    """WRITE_MEM then READ_MEM through the bridge, on block RAM and on SDRAM (whose port stalls the bridge)."""
    rng = random.Random(1)
    pb = CFG.port_bytes
    # words full of the two framing bytes, so both directions escape
    data = bytes(rng.choice([link.END, link.ESC, 0, 0xFF, rng.randrange(256)]) for _ in range(6 * pb))
    raw = run_bridge([request(1, link.Cmd.WRITE_MEM, link.pack("I", 3) + data),
                      request(2, link.Cmd.READ_MEM, link.pack("IH", 3, 6)),
                      request(3, link.Cmd.READ_MEM, link.pack("IH", 2, 1)),
                      request(4, link.Cmd.INFO)], **memory)
    r1, r2, r3, info = replies(raw)
    assert r1 == bytes([1, link.Status.OK])
    assert r2 == bytes([2, link.Status.OK]) + data
    assert r3 == bytes([3, link.Status.OK]) + bytes(pb)
    assert info[3] == (2 if memory else 0)  # INFO's flags: bit 1, the memory is SDRAM


def test_corrupt_frame_dropped_and_counted_bad_requests_refused():
    good = request(4, link.Cmd.READ_MEM, link.pack("IH", 0, 1))
    bad = bytearray(good)
    bad[4] ^= 0x10
    raw = run_bridge([bytes(bad), request(5, link.Cmd.READ_MEM, link.pack("IH", 4096 // CFG.port_bytes, 1)),
                      request(6, 0x7E), request(8, link.Cmd.INFO)])
    r5, r6, info = replies(raw)  # nothing for the corrupted frame
    assert r5 == bytes([5, link.Status.BAD_REQUEST])  # beyond the memory
    assert r6 == bytes([6, link.Status.BAD_REQUEST])  # unknown command
    assert int.from_bytes(info[-2:], "little") == 1  # the dropped frame, counted


def test_framer_escapes_every_byte_value():
    framer = SlipFramer()
    sim = Simulator(framer)
    sim.add_clock(1e-8)
    body = bytes(range(256))
    out = []

    async def feed(ctx):
        for i, byte in enumerate(body):
            ctx.set(framer.payload.payload, {"data": byte, "last": i == len(body) - 1})
            ctx.set(framer.payload.valid, 1)
            await ctx.tick().until(framer.payload.ready)
        ctx.set(framer.payload.valid, 0)

    async def drain(ctx):
        ctx.set(framer.wire.ready, 1)
        while len(out) < 2 or out[-1] != link.END:
            _, _, valid, byte = await ctx.tick().sample(framer.wire.valid, framer.wire.payload)
            if valid:
                out.append(byte)

    sim.add_testbench(feed)
    sim.add_testbench(drain)
    sim.run()
    assert bytes(out) == link.frame(body)


@pytest.mark.parametrize("divisor", [0, 3, 4.5])
def test_divisor_refused(divisor):
    with pytest.raises(ValueError, match="divisor"):
        BoardTop(CFG, mem_bytes=4096, divisor=divisor, overlay=False)


def test_read_every_space_status_and_write_reg_against_overlay_ports():
    """The bridge alone on the overlay's host ports, each driven as the overlay does (buffers: data the cycle after
    the address; registers, exponent registers, counters: combinational), with a counter that moves every cycle:
    READ of each space returns each value's bytes whole (a counter from one cycle, not torn across its bytes),
    STATUS its fields, WRITE_REG reaches the register port."""
    from amaranth.hdl import Cat, Module, Signal
    from kvoverlay.boards.bridge import HostBridge
    from kvoverlay.hw.overlay import COUNTERS

    from kvoverlay import isa

    n_ctr = len(COUNTERS)
    br = HostBridge(CFG, 64, n_ctr, 0x1234ABCD)
    m = Module()
    m.submodules.br = br
    ov = br.ov
    cycle = Signal(8)
    m.d.sync += cycle.eq(cycle + 1)
    abuf_bits = len(ov.dbg_abuf_data)
    ctr = Signal(8)
    # each value a function of its address the tests can recompute; the buffers' one cycle later
    m.d.sync += [ov.dbg_abuf_data.eq(Cat(*((ov.dbg_abuf_addr * 7 + k)[:8] for k in range(abuf_bits // 8)))),
                 ov.dbg_acc_data.eq(Cat(ov.dbg_acc_addr, Signal(8, init=0x5A)) * 0x01000193)]
    m.d.comb += [ov.dbg_reg_data.eq(ov.dbg_reg_addr * 0x01010101 + 0x80402010),
                 ov.dbg_ereg_data.eq(-1 - ov.dbg_ereg_addr),
                 ctr.eq(ov.ctr_addr), ov.ctr_data.eq(Cat(ctr, *(cycle for _ in range(7)))),
                 ov.error.eq(1), ov.error_code.eq(3), ov.error_info.eq(0x42), ov.error_pc.eq(0xDEADBEEF)]
    reg_writes = []
    out = bytearray()

    reqs = [request(1, link.Cmd.READ, link.pack("BHH", link.Space.ABUF, 2, 3)),
            request(2, link.Cmd.READ, link.pack("BHH", link.Space.ACC, 5, 2)),
            request(3, link.Cmd.READ, link.pack("BHH", link.Space.REGS, 1, 3)),
            request(4, link.Cmd.READ, link.pack("BHH", link.Space.EREGS, 0, 2)),
            request(5, link.Cmd.READ, link.pack("BHH", link.Space.COUNTERS, 0, n_ctr)),
            request(6, link.Cmd.STATUS),
            request(7, link.Cmd.WRITE_REG, link.pack("BI", 9, 0xCAFEF00D)),
            request(8, link.Cmd.READ, link.pack("BHH", link.Space.REGS, isa.NUM_REGS - 1, 2)),
            request(9, link.Cmd.INFO)]

    async def host(ctx):
        ctx.set(br.tx.ready, 1)
        for data in reqs:
            for byte in data:
                ctx.set(br.rx.payload, byte)
                ctx.set(br.rx.valid, 1)
                await ctx.tick()
                ctx.set(br.rx.valid, 0)
                await ctx.tick().repeat(2)
            quiet = 0
            while quiet < 40:  # until the reply has ended
                _, _, valid, byte = await ctx.tick().sample(br.tx.valid, br.tx.payload)
                if valid:
                    out.append(byte)
                quiet = 0 if valid else quiet + 1

    async def watch(ctx):
        async for _, _, we, addr, value in ctx.tick().sample(ov.host_reg_we, ov.host_reg_addr, ov.host_reg_data):
            if we:
                reg_writes.append((addr, value))

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.add_testbench(watch, background=True)
    sim.run()
    got = replies(bytes(out))
    assert [r[:2] for r in got] == [bytes([i + 1, link.Status.OK]) for i in range(7)] + \
        [bytes([8, link.Status.BAD_REQUEST]), bytes([9, link.Status.OK])]
    abuf_bytes = abuf_bits // 8
    assert got[0][2:] == bytes((a * 7 + k) & 0xFF for a in (2, 3, 4) for k in range(abuf_bytes))
    acc = [int.from_bytes(got[1][2 + 8 * i:10 + 8 * i], "little") for i in range(2)]
    assert acc == [((a | 0x5A << len(ov.dbg_acc_addr)) * 0x01000193) % (1 << 64) for a in (5, 6)]
    assert got[2][2:] == b"".join(((r * 0x01010101 + 0x80402010) % (1 << 32)).to_bytes(4, "little") for r in (1, 2, 3))
    assert got[3][2:] == b"".join(((-1 - e) % (1 << 16)).to_bytes(2, "little") for e in (0, 1))
    ctrs = [got[4][2 + 8 * i:10 + 8 * i] for i in range(n_ctr)]
    assert [c[0] for c in ctrs] == list(range(n_ctr))
    assert all(len(set(c[1:])) == 1 for c in ctrs), ctrs  # one cycle's value, not torn
    assert len({c[1] for c in ctrs}) == n_ctr  # and read as the reply goes, one value after another
    flags, code, info, pc, runs = __import__("struct").unpack("<BBBII", got[5][2:])
    assert (flags, code, info, pc, runs) == (4, 3, 0x42, 0xDEADBEEF, 0)
    assert reg_writes == [(9, 0xCAFEF00D)]
    assert got[8][2:][8:12] == (0x1234ABCD).to_bytes(4, "little")
