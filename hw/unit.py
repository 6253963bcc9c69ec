"""Pieces every memory unit is built from: the command sequencer, the record and row geometry, the word packer.

A unit of :func:`hw.ports.unit_signature` runs one instruction at a time through an FSM; :class:`Sequencer`
writes the parts of that FSM that every unit shares (the idle state that takes the command, ``busy``, the fault
register and the completion pulse), so a unit's ``elaborate`` holds only the states of its own datapath.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import isa
from kvoverlay import numerics as nx

from .ports import Fault, abuf_lanes, abuf_write
from .widths import log2_exact

__all__ = ["Sequencer", "WordPacker", "record_geometry", "row_geometry", "word_sizes"]


class Sequencer:
    """The shared states of a unit's FSM, for a component of :func:`hw.ports.unit_signature`.

    ``with seq.fsm(first):`` opens the FSM: its ``IDLE`` state holds ``cmd.ready`` and latches the instruction
    into :attr:`insn` on the transfer, then goes to state *first*; the unit's own states go inside the block; a
    ``FAIL`` state completes with the fault that :meth:`fail` recorded. ``busy`` is high in every state but
    ``IDLE``, so it covers the completion cycle as the protocol asks.

    Parameters
    ----------
    m : Module
    unit : wiring.Component
        The unit; its ``cmd``, ``busy`` and ``done`` members are driven here.
    name : str
        Prefix of the signal and FSM names.

    Attributes
    ----------
    insn : View
        The instruction being executed, viewed through the unit's ``cmd`` layout.
    fault : Signal(Fault)
        The fault recorded by :meth:`fail`.
    """

    def __init__(self, m: Module, unit, name: str):
        self.m, self.unit, self.name = m, unit, name
        self.insn = Signal(unit.cmd.payload.shape(), name=f"{name}_insn")
        self.fault = Signal(Fault, name=f"{name}_fault")

    @contextmanager
    def fsm(self, first: str):
        m, cmd = self.m, self.unit.cmd
        with m.FSM(name=f"{self.name}_fsm") as fsm:
            with m.State("IDLE"):
                m.d.comb += cmd.ready.eq(1)
                with m.If(cmd.valid):
                    m.d.sync += self.insn.eq(cmd.payload)
                    m.next = first
            yield
            with m.State("FAIL"):
                self.complete(self.fault)
        m.d.comb += self.unit.busy.eq(~fsm.ongoing("IDLE"))

    def complete(self, fault=Fault.NONE):
        """Pulse ``done`` with *fault* in this cycle and return to ``IDLE``."""
        self.m.d.comb += [self.unit.done.valid.eq(1), self.unit.done.payload.eq(fault)]
        self.m.next = "IDLE"

    def fail(self, fault: Fault):
        """Record *fault* and complete with it in the next cycle (state ``FAIL``)."""
        self.m.d.sync += self.fault.eq(fault)
        self.m.next = "FAIL"

    @contextmanager
    def check(self, *faults):
        """``with seq.check(*faults):`` the first of *faults* (``(condition, Fault)`` pairs, in priority order)
        that holds fails the instruction; the block runs when none does."""
        m = self.m
        for i, (cond, fault) in enumerate(faults):
            with (m.If if i == 0 else m.Elif)(cond):
                self.fail(fault)
        with m.Else():
            yield


def word_sizes(config) -> tuple:
    """``(port_bytes, log2(port_bytes), lanes, log2(lanes))``: the memory port's word in bytes and the activation
    buffer's word in int16 lanes, with the shifts that divide by them."""
    lanes = abuf_lanes(config)
    return config.port_bytes, log2_exact(config.port_bytes), lanes, log2_exact(lanes)


def record_geometry(m: Module, length, port_bytes: int, name: str) -> SimpleNamespace:
    """The layout of a vector record (:func:`kvoverlay.numerics.pack_vector_record`) of *length* mantissas.

    Returns ``exp_offset`` (byte offset of the int32 exponent: the mantissas padded to 4 bytes), ``size``
    (bytes) and ``beats`` (port words).
    """
    wide = unsigned(len(length) + 3)
    g = SimpleNamespace(exp_offset=Signal(wide, name=f"{name}_exp_offset"), size=Signal(wide, name=f"{name}_bytes"),
                        beats=Signal(wide, name=f"{name}_beats"))
    m.d.comb += [g.exp_offset.eq(((length << 1) + 3) & ~3), g.size.eq(g.exp_offset + 4),
                 g.beats.eq((g.size + port_bytes - 1) >> log2_exact(port_bytes))]
    return g


def row_geometry(m: Module, insn, config, name: str) -> SimpleNamespace:
    """The row record of a quantized matrix (:func:`kvoverlay.numerics.row_stride`) for an LDROW or GEMV
    instruction *insn* (fields ``cols``, ``fmt``, ``lg_group``).

    Returns ``group_log2``, ``groups`` (scales per row), ``bits_log2`` (log2 of the weight bits),
    ``weight_bytes``, ``words`` (port words per row) and ``built`` (whether the unit is built with the format).
    """
    pb = config.port_bytes
    cols = insn.cols
    largest_group = (1 << len(insn.lg_group)) - 1 + log2_exact(isa.GROUP_BASE)
    g = SimpleNamespace(group_log2=Signal(range(largest_group + 1), name=f"{name}_group_log2"),
                        groups=Signal(len(cols), name=f"{name}_groups"),
                        bits_log2=Signal(range(log2_exact(max(nx.WEIGHT_FORMATS.values())) + 1),
                                         name=f"{name}_weight_bits_log2"),
                        weight_bytes=Signal(len(cols) + 1, name=f"{name}_weight_bytes"),
                        words=Signal(len(cols) + 2, name=f"{name}_row_words"),
                        built=Signal(name=f"{name}_format_built"))
    m.d.comb += [g.group_log2.eq(insn.lg_group + log2_exact(isa.GROUP_BASE)), g.groups.eq(cols >> g.group_log2)]
    with m.Switch(insn.fmt):
        for code, fmt in enumerate(isa.ENUMS["fmt"]):
            with m.Case(code):
                m.d.comb += [g.bits_log2.eq(log2_exact(nx.WEIGHT_FORMATS[fmt])),
                             g.built.eq(fmt in config.weight_formats)]
    m.d.comb += [g.weight_bytes.eq((cols << g.bits_log2) >> 3),
                 g.words.eq((g.groups * 2 + g.weight_bytes + pb - 1) >> log2_exact(pb))]
    return g


class WordPacker(wiring.Component):
    """Writes a stream of int16 mantissas into activation-buffer words, one lane per mantissa.

    Each mantissa fills the next lane of the current word and is written in the cycle after it arrives, alone (its
    lane's enable, the value on every lane); the word advances after its last lane or after the element flagged
    ``last``. ``clear`` (at the start of a pass) restarts at word ``base``. Built with *lanes* (``wide``), an
    element carries ``lanes`` mantissas, those of ``mask``, for the next ``lanes`` lanes of the word.

    The value replicated over the word, not placed in a word buffer: the buffer's shared write port then has 16
    distinct data bits from this writer (``16 * lanes``), which the overlay multiplexes once per
    :func:`~hw.ports.abuf_write_beat` of the word instead of per bit (docs/boards.md, "The activation buffer's write
    port"), and the 1,024-bit word buffer (ulx3s) goes. A word's lanes land over its cycles rather than at once: no
    other unit reads a word a running instruction writes (the compiler's tokens keep them apart), so only the
    word's final contents are seen.

    Parameters
    ----------
    config : OverlayConfig
    lanes : int
        Mantissas an element may carry (a power of two dividing the word's lanes); with more than one, ``wide``
        picks per pass between elements of ``lanes`` mantissas and of one (in ``value``'s low lane).

    Attributes
    ----------
    base : In
        Buffer word of the first element.
    clear : In(1)
    wide : In(1)
        Only with *lanes* above one.
    lane : In(stream.Signature({value, mask, last}, always_ready=True))
        ``mask`` (the lanes of a wide element that are written) only with *lanes* above one.
    abuf_w : Out(abuf_write(config))
    """

    def __init__(self, config, lanes: int = 1):
        self.config, self.element_lanes = config, lanes
        self.lanes = abuf_lanes(config)
        if lanes < 1 or lanes & (lanes - 1) or self.lanes % lanes:
            self._MustUse__silence = True  # a rejected component is not an unused one
            raise ValueError(f"an element fills a power of two of a word's {self.lanes} lanes; got lanes={lanes!r}")
        port = abuf_write(config)
        element = {"value": 16 * lanes, **({"mask": lanes} if lanes > 1 else {}), "last": 1}
        super().__init__({"base": In(port.members["addr"].shape), "clear": In(1),
                          **({"wide": In(1)} if lanes > 1 else {}),
                          "lane": In(stream.Signature(data.StructLayout(element), always_ready=True)),
                          "abuf_w": Out(port)})

    def elaborate(self, platform):
        m = Module()
        lanes, per = self.lanes, self.element_lanes
        payload = self.lane.payload
        # the group of per lanes to fill, one-hot (a registered copy of the write's lane enables, by group); in a
        # pass of one mantissa per element (not wide), the lane within the group too
        group = Signal(lanes // per, name="lane_onehot", init=1)
        word = Signal.like(self.abuf_w.addr, name="word")
        wr_word = Signal.like(self.abuf_w.addr, name="write_word")
        wr_lane = Signal(lanes, name="write_lane")
        value = Signal(16 * per, name="write_value")
        m.d.comb += [self.abuf_w.addr.eq(self.base + wr_word), self.abuf_w.data.eq(value.replicate(lanes // per)),
                     self.abuf_w.en.eq(wr_lane)]
        if per > 1:
            sub = Signal(per, name="sublane_onehot", init=1)
            mask, step = Mux(self.wide, payload.mask, sub), self.wide | sub[-1]
            written = Mux(self.wide, payload.value, payload.value[:16].replicate(per))
        else:
            mask, step, written = Const(1, 1), Const(1, 1), payload.value
        m.d.sync += wr_lane.eq(0)
        with m.If(self.clear):
            m.d.sync += [group.eq(1), word.eq(0)]
            if per > 1:
                m.d.sync += sub.eq(1)
        with m.Elif(self.lane.valid):
            m.d.sync += [value.eq(written), wr_word.eq(word),
                         wr_lane.eq(Cat(mask & group[g].replicate(per) for g in range(lanes // per)))]
            if per > 1:
                m.d.sync += sub.eq(sub.rotate_left(1))
            with m.If(step):
                m.d.sync += group.eq(group.rotate_left(1))
            with m.If((group[-1] & step) | payload.last):
                m.d.sync += word.eq(word + 1)
        return m
