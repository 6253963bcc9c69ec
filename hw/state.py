"""The on-chip state the execution units share, and its wiring to them by signature.

The activation buffer, the accumulator buffer, the exponent registers and the scalar registers live here. A unit
declares its ports with the signatures of :mod:`hw.ports`; :meth:`OnChipState.attach` gives every port of a
unit a port on the state by that signature alone, so a top (the overlay, a unit's simulation top) names no
unit's ports. A host (a testbench, the board's bridge) reaches the state through the same signatures.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Signal, Value, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa
from kvoverlay import numerics as nx

from .arith import select_value, select_word
from .ports import (
    EREG_SHAPE,
    abuf_lanes,
    abuf_read,
    abuf_write,
    abuf_write_beat,
    acc_read,
    acc_write,
    ereg_read,
    ereg_write,
    reg_read,
    reg_write,
)
from .widths import log2_exact

__all__ = ["OnChipState", "host_signature", "ports_of"]


def _kinds(config) -> dict:
    return {"abuf_r": abuf_read(config), "abuf_w": abuf_write(config), "acc_r": acc_read(config),
            "acc_w": acc_write(config), "ereg_r": ereg_read(), "ereg_w": ereg_write(), "reg_r": reg_read(),
            "reg_w": reg_write()}


def host_signature(config, *kinds) -> wiring.Signature:
    """Host access to the state, seen from the host: one port of each of *kinds* (``abuf_r``, ``abuf_w``,
    ``acc_r``, ``acc_w``, ``ereg_r``, ``ereg_w``, ``reg_r``, ``reg_w``; all of them if none is named)."""
    every = _kinds(config)
    return wiring.Signature({kind: Out(every[kind]) for kind in (kinds or every)})


def ports_of(unit, signature) -> list:
    """The port members of *unit* (a component, or an interface seen from its driver) of *signature*, in
    declaration order."""
    return [getattr(unit, name) for name, member in unit.signature.members.items()
            if member.is_signature and member.flow == Out and member.signature == signature]


def _share(m, sel, target, sources):
    """Drive memory port *target* from the unit port that *sel* picks among *sources* [(unit index, port)]:
    the unit's outputs (address, enables, write data) are multiplexed, the read data fans out to every unit.
    A ``Switch``: these multiplexers and the overlay's counter read as trees of 2:1 multiplexers (:func:`~hw.arith.select_value`)
    made the ulx3s overlay module 156 LUT4 larger (docs/boards.md, "The glue")."""
    for name, member in sources[0][1].signature.members.items():
        if member.flow == Out:
            with m.Switch(sel):
                for index, port in sources:
                    with m.Case(index):
                        m.d.comb += getattr(target, name).eq(getattr(port, name))
        else:
            for _, port in sources:
                m.d.comb += getattr(port, name).eq(getattr(target, name))


def _read_port(m, memory, signature, name, poison):
    """A read port of *memory* with the members of *signature* (``addr``, ``en``, ``data`` one cycle later): a
    combinational read and the data register after it, which Yosys's ``memory_dff`` merges into the block RAM's
    synchronous read port.

    Amaranth's synchronous read port is read-first: in the cycle a write port writes the address it reads, it returns
    the old word. An ECP5 block RAM leaves a read of the word its other port writes undefined, so Yosys emulates the
    read-first port (the write delayed a cycle and a bypass multiplexer on every read bit: 2.3k LUT4 and 3.4k FF in
    the ulx3s glue). No unit uses such a read (docs/boards.md, "Read-first emulation"), so the buffers' memories
    carry ``no_rw_check``, which Yosys honours only where it merges the read register itself.

    Returns the port, with *poison* (simulation builds) the mask of the read word's bits that are written in the
    same cycle (for :meth:`OnChipState.attach_groups` to drive: those bits read inverted, as the block RAM may
    return anything there, so a unit that used one fails the bit-exact regression), and the read as the memory sees
    it (its row address, enable and row), which :func:`_collisions` compares with the write ports."""
    port = signature.create(path=(name,))
    rd = memory.read_port(domain="comb")
    mask = Signal.like(rd.data, name=f"{name}_collision") if poison else None
    word = rd.data if mask is None else rd.data ^ mask
    rows = len(port.addr) - len(rd.addr)
    if rows:
        # a row of 2**rows words (the accumulator buffer's, hw/ports.acc_read): the row is the block RAM's
        # registered output, and the addressed word is picked from it by the address's low bits, registered too
        lo = Signal(rows, name=f"{name}_word")
        m.d.comb += [rd.addr.eq(port.addr >> rows), port.data.eq(port.row.word_select(lo, len(port.data)))]
        with m.If(port.en):
            m.d.sync += [port.row.eq(word), lo.eq(port.addr[:rows])]
    else:
        m.d.comb += rd.addr.eq(port.addr)
        with m.If(port.en):
            m.d.sync += port.data.eq(word)
    return port, mask, SimpleNamespace(addr=rd.addr, en=port.en, data=rd.data)


#: Bits of a block RAM row that a collision may spoil (an ECP5 DP16KD at its widest holds 36: two int16 lanes); a
#: poisoned read (:func:`_read_port`) spoils every row that a written lane touches.
BRAM_ROW_BITS = 32


def _collisions(port, writes):
    """The bits of read port *port*'s word that the write ports *writes* write in the cycle it reads it, widened to
    whole rows of :data:`BRAM_ROW_BITS`."""
    mask = 0
    for wp in writes:
        grain = len(port.data) // len(wp.en)
        per_row = max(1, BRAM_ROW_BITS // grain)
        rows = [Cat(wp.en[i:i + per_row]).any() for i in range(0, len(wp.en), per_row)]
        mask = mask | Cat((port.en & (wp.addr == port.addr) & row).replicate(grain * per_row) for row in rows)
    return mask


class OnChipState:
    """The buffers and register files of one overlay (or of a unit's simulation top), built into module *m*.

    Parameters
    ----------
    m : Module
    config : OverlayConfig
    poison : bool
        Simulation builds only: a buffer read of lanes written in the same cycle reads them inverted
        (:func:`_read_port`), where the block RAM leaves them undefined.

    Attributes
    ----------
    abuf, accbuf : Memory
        Activation buffer (``abuf_lanes`` int16 lanes per word, one write enable per lane) and accumulator buffer.
    eregs, regs : Array of Signal
        Exponent registers (at ``EXP_MIN`` after reset) and scalar registers.
    """

    def __init__(self, m, config, *, poison=False):
        self.m, self.config, self.poison = m, config, poison
        lanes = abuf_lanes(config)
        # no_rw_check: no read uses a lane that is written in the same cycle (_read_port)
        m.submodules.abuf = self.abuf = Memory(shape=unsigned(16 * lanes), depth=config.act_buffer_words // lanes,
                                               init=[], attrs={"no_rw_check": 1})
        # rows of acc_lanes words, a write enable each: REQ reads a row per cycle, the other units a word
        m.submodules.accbuf = self.accbuf = Memory(shape=unsigned(64 * config.acc_lanes),
                                                   depth=config.acc_buffer_words // config.acc_lanes, init=[],
                                                   attrs={"no_rw_check": 1})
        self._writes, self._reads = {self.abuf: [], self.accbuf: []}, []
        self._mirrors = []  # (memory, lanes): copies of the activation buffer's first lanes (_narrow_read)
        self.eregs = Array(Signal(EREG_SHAPE, init=nx.EXP_MIN, name=f"ereg{i}") for i in range(isa.NUM_EREGS))
        self.regs = Array(Signal(32, name=f"reg{i}") for i in range(isa.NUM_REGS))

    def attach(self, units, sel=0, *, beat_writes=True):
        """Wire *units* (a list) to ports of their own on the state: :meth:`attach_groups` of one group."""
        self.attach_groups([(units, sel)], beat_writes=beat_writes)

    def attach_groups(self, groups, owner=None, *, beat_writes=True, own=()):
        """Wire *groups* [(units, sel)] to the state, one port of each buffer kind shared by all of them.

        With *beat_writes* (units; not a testbench's host port, which writes whole words), an activation-buffer
        write port takes the first :func:`~hw.ports.abuf_write_beat` bits of its writer's data and replicates them
        over the word, as every unit's data repeats there: the writers' multiplexer is a beat wide (the vector
        unit, the attention engine and LDROW are synthesized apart from it, so Yosys could not find the
        repetition itself).

        Within a group the unit that ``sel`` picks drives its ports; between groups, the group that ``owner[kind]``
        picks (an index into *groups*; needed only for a kind that several groups use). A port's read data fans out
        to every unit. A kind gets as many ports as the unit with the most of them declares, and a unit's i-th port
        of a kind drives the i-th, so that one read and one write port of each buffer serve groups whose units
        declare one each (a buffer then maps to one copy of block RAM). Register reads are combinational, and the
        units of a group share the register files' ports in the same way (a unit reads and writes registers only
        from the cycle after its command is taken, while ``sel`` picks it, to its ``done``); register writes land
        at the clock edge (two groups never write one register at once: the golden model reports that as a
        race).

        Each read port of *own* (ports of the groups' units) gets a port that no other group's unit shares: the
        port of an index that only its own group's other units use, where there is one (the group's units run one at
        a time), else a port of its own, a further copy of that buffer's block RAM.

        A unit's ``narrow_reads`` (a dict, port name to lanes) names activation-buffer read ports of which it uses
        only the first lanes of the word: each gets a port of its own on a copy of only those lanes (the other lanes
        read zero), a few block RAMs where a word-wide copy takes ``abuf_lanes / 2``."""
        m, kinds, owner = self.m, _kinds(self.config), owner or {}
        own_ids = {id(p) for p in own}
        narrow = {id(getattr(unit, name)): lanes for units, _ in groups for unit in units
                  for name, lanes in getattr(unit, "narrow_reads", {}).items()}

        def write_port(memory, beat=None, rows=0, **kwargs):
            """A write port of *memory* behind a register: the writers' multiplexer ends in it, so that a path from
            a unit's write logic ends there rather than at the block RAMs' inputs across the chip. The word is
            written a cycle after the unit's ``en``: a read of it issued in that next cycle returns the old word
            (a poisoned build: inverted), which no unit does. With *beat* (a width), the data register holds one
            beat that the port replicates over the word. With *rows* (log2 of the words in a row: the accumulator
            buffer's), the unit writes one word: the address of its row and its one-hot enable are registered."""
            self._writes[memory].append(port := memory.write_port(**kwargs))
            k = len(self._writes[memory]) - 1
            name = f"{'abuf' if memory is self.abuf else 'acc'}_w{k}"
            staged = SimpleNamespace(addr=Signal(len(port.addr) + rows, name=f"{name}_addr"),
                                     en=Signal(1 if rows else len(port.en), name=f"{name}_en"),
                                     data=Signal(beat or len(port.data), name=f"{name}_data"))
            held = Signal.like(staged.data, name=f"{name}_data_reg")
            en = (staged.en << staged.addr[:rows]) if rows else staged.en
            m.d.sync += [port.addr.eq(staged.addr >> rows), port.en.eq(en), held.eq(staged.data)]
            m.d.comb += port.data.eq(held.replicate(len(port.data) // len(held)))
            if memory is self.abuf:
                for mirror, lanes in self._mirrors:
                    self._mirror_write(mirror, lanes, port)
            return staged  # _share truncates a unit's data to the beat

        def abuf_write_port():
            return write_port(self.abuf, abuf_write_beat(self.config) if beat_writes else None, granularity=16)

        def read_port(memory, kind):
            port, mask, seen = _read_port(m, memory, kinds[kind], f"{kind}{len(self._reads)}", self.poison)
            self._reads.append((memory, seen, mask))
            return port

        acc_rows = log2_exact(self.config.acc_lanes)
        new_port = {"abuf_w": abuf_write_port,
                    "acc_w": lambda: write_port(self.accbuf, *((64, acc_rows) if acc_rows else ()),
                                                **({"granularity": 64} if acc_rows else {})),
                    "abuf_r": lambda: read_port(self.abuf, "abuf_r"), "acc_r": lambda: read_port(self.accbuf, "acc_r")}
        for kind, make in new_port.items():
            # slots[j]: the sources (group, unit, port) of the kind's j-th port: each unit's j-th port not of *own*
            slots, mine = [], []
            for g, (units, _) in enumerate(groups):
                for i, unit in enumerate(units):
                    j = 0
                    for p in ports_of(unit, kinds[kind]):
                        if id(p) in narrow:
                            if kind != "abuf_r":
                                raise ValueError(f"narrow_reads of {unit!r}: only activation-buffer read ports "
                                                 f"read a word's first lanes, not {kind}")
                            self._narrow_read(p, narrow[id(p)])
                        elif id(p) in own_ids:
                            if kind not in ("abuf_r", "acc_r"):
                                raise ValueError(f"own={own!r}: only read ports get a port of their own, not {kind}")
                            mine.append((g, i, p))
                        else:
                            if j == len(slots):
                                slots.append([])
                            slots[j].append((g, i, p))
                            j += 1
            for g, i, p in mine:
                free = [s for s in slots if all(sg == g and si != i for sg, si, _ in s)]
                if free:
                    free[0].append((g, i, p))
                else:
                    port = make()
                    m.d.comb += [port.addr.eq(p.addr), port.en.eq(p.en), p.data.eq(port.data)]
            for j, sources in enumerate(slots):
                shared = len({g for g, _, _ in sources}) > 1
                choice = Signal(range(max(2, len(sources))), name=f"{kind}{j}_source")
                for k, (g, i, _) in enumerate(sources):
                    picked = Value.cast(groups[g][1]) == i
                    with m.If(picked & (owner[kind] == g) if shared else picked):
                        m.d.comb += choice.eq(k)
                _share(m, choice, make(), [(k, port) for k, (_, _, port) in enumerate(sources)])
        for file, read, write in ((self.eregs, "ereg_r", "ereg_w"), (self.regs, "reg_r", "reg_w")):
            # a read is a tree of 2:1 multiplexers over the file; indexing the Array instead builds one equality
            # decoder per register and port and an AND-OR of all registers (a Yosys $pmux, larger on the ECP5)
            flat = Cat(*file)
            width = len(file[0])
            writers = []
            for g, (units, sel) in enumerate(groups):
                # the units of a group share its read ports, as they share the buffers' ports: the i-th port of the
                # unit that sel picks drives the i-th address (a unit reads registers only while it runs)
                ports = [ports_of(unit, kinds[read]) for unit in units]
                for j in range(max((len(p) for p in ports), default=0)):
                    sources = {i: p[j] for i, p in enumerate(ports) if len(p) > j}
                    first = next(iter(sources.values())).addr
                    addr = first if len(sources) == 1 else select_value(
                        m, {i: port.addr for i, port in sources.items()}, sel, name=f"{read}{g}_{j}_addr")
                    data = select_word(m, flat, addr, width, name=f"{read}{g}_{j}_data")
                    for port in sources.values():
                        m.d.comb += port.data.eq(data)
                # the units of a group run one at a time, so their write ports merge into one before the file:
                # a register then has one write-data mux input per group, not one per unit
                ports = [port for unit in units for port in ports_of(unit, kinds[write])]
                if len(ports) > 1:
                    merged = kinds[write].create(path=(f"{write}_group{len(writers)}",))
                    for port in ports:  # the last port wins, as separate writes to one register would
                        with m.If(port.en):
                            m.d.comb += [merged.en.eq(1), merged.addr.eq(port.addr), merged.data.eq(port.data)]
                    ports = [merged]
                writers += ports
            for i, reg in enumerate(file):
                for port in writers:
                    with m.If(port.en & (port.addr == i)):
                        m.d.sync += reg.eq(port.data)
        # every read port against every write port so far (a later attach adds ports: its assignment wins)
        for memory, port, mask in self._reads:
            if mask is not None:
                m.d.comb += mask.eq(_collisions(port, self._writes[memory]))

    def _narrow_read(self, unit_port, lanes):
        """Drive *unit_port* (an activation-buffer read port of which its unit uses the first *lanes* lanes) from a
        read port of its own on a copy of those lanes alone, which every activation-buffer write port writes too."""
        if not 0 <= lanes <= abuf_lanes(self.config):
            raise ValueError(f"narrow_reads: {lanes!r} lanes of a {abuf_lanes(self.config)}-lane word")
        if lanes == 0:
            self.m.d.comb += unit_port.data.eq(0)
            return
        name = f"abuf_lanes{len(self._mirrors)}"
        mirror = Memory(shape=unsigned(16 * lanes), depth=self.abuf.depth, init=[], attrs={"no_rw_check": 1})
        self.m.submodules[name] = mirror
        self._mirrors.append((mirror, lanes))
        self._writes[mirror] = []
        for port in self._writes[self.abuf]:
            self._mirror_write(mirror, lanes, port)
        signature = wiring.Signature({"addr": Out(range(self.abuf.depth)), "en": Out(1), "data": In(16 * lanes)})
        port, mask, seen = _read_port(self.m, mirror, signature, f"{name}_r", self.poison)
        self._reads.append((mirror, seen, mask))
        self.m.d.comb += [port.addr.eq(unit_port.addr), port.en.eq(unit_port.en), unit_port.data.eq(port.data)]

    def _mirror_write(self, mirror, lanes, port):
        """A write port of *mirror* that writes *lanes* first lanes as the activation buffer's write port *port*
        does, from the same registers."""
        self._writes[mirror].append(wp := mirror.write_port(granularity=16))
        self.m.d.comb += [wp.addr.eq(port.addr), wp.en.eq(port.en[:lanes]), wp.data.eq(port.data[:16 * lanes])]

