"""Requantizer: wide values, one per cycle, into a bfp16 vector, bit-exact with :func:`kvoverlay.numerics.normalize`.

The REQ unit feeds it accumulator words, the LDROW unit dequantized weights (``q * scale``).
"""

from __future__ import annotations

import functools
import operator

from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import numerics as nx

from .normalize import _BOUNDED_BITS, _UNDERFLOW_CAP, MANT_SHAPE, bit_length
from .ports import EREG_SHAPE, Fault, abuf_write
from .unit import WordPacker

__all__ = ["Requantizer", "add_requantizer", "complete_requantization", "requant_command"]


def requant_command(config, lanes: int = 1) -> data.StructLayout:
    """A requantization: ``len`` values, the exponent they are scaled by, the first activation-buffer word, whether
    the peak pass is folded (``fold``: the values' peak is already on the requantizer's ``peak`` input), and, for a
    requantizer of several *lanes*, whether the values come ``lanes`` at a time (``wide``) or one at a time."""
    return data.StructLayout({"len": 16, "exp": EREG_SHAPE,
                              "dst": abuf_write(config).members["addr"].shape, "fold": 1,
                              **({"wide": 1} if lanes > 1 else {})})


class _RoundShifts:
    """The round pass's shifts of a *width*-bit value: :func:`~hw.normalize.scalar_mantissa` (bounded) with its
    clamps and rounding biases taken out of the per-value path. They are fixed for a vector once its peak is known,
    so :meth:`latch` registers them with the peak's shift and each value's round starts from registers: the wide
    value plus its bias (a carry chain, wrapping at 64 bits as numpy's int64 does), then a shift that keeps
    :data:`~hw.normalize._BOUNDED_BITS` bits."""

    def __init__(self, width: int):
        # a bounded value's peak has at most width bits: the right shift is at most width - MANT_BITS
        rmax = width - nx.MANT_BITS
        self.wrap = 64 if width >= 64 else None
        self.right = Signal(name="round_right")
        self.rs = Signal(range(rmax + 1), name="round_rs")
        self.bias = Signal(rmax, name="round_bias")  # 2**(rs - 1), 0 for rs == 0
        self.ls = Signal(range(nx.MANT_BITS + 1), name="round_ls")
        self.urs = Signal(range(_UNDERFLOW_CAP + 1), name="underflow_rs")
        self.ubias = Signal(_UNDERFLOW_CAP, name="underflow_bias")

    def latch(self, m: Module, shift, under):
        """Registers the shifts for the peak's *shift* (at least ``-MANT_BITS``) and the underflow *under* (no
        underflow when it is not positive)."""
        rs = Signal.like(self.rs, name="round_rs_next")
        urs = Signal.like(self.urs, name="underflow_rs_next")
        m.d.comb += [rs.eq(Mux(shift > 0, shift, 0)),
                     urs.eq(Mux(under > _UNDERFLOW_CAP, _UNDERFLOW_CAP, Mux(under > 0, under, 0)))]
        m.d.sync += [self.right.eq(shift > 0), self.rs.eq(rs), self.bias.eq((Const(1, len(self.bias) + 1) << rs) >> 1),
                     self.ls.eq(Mux(shift < 0, -shift, 0)), self.urs.eq(urs),
                     self.ubias.eq((Const(1, _UNDERFLOW_CAP + 1) << urs) >> 1)]

    def mantissa(self, m: Module, value, *, registered: int) -> Signal:
        """The mantissa of *value* (at most the peak in magnitude) under the latched shifts, ``registered`` cycles
        later: a register between the round-shift and the clip (as :func:`~hw.normalize.mantissa` has), then one
        after the underflow round."""
        vw = len(value)
        # exact: |value| + bias < 2**vw; with the wrap, as int64
        biased = Signal(signed(self.wrap or vw + 1), name="round_biased")
        scaled = Signal(signed(_BOUNDED_BITS), name="round_scaled")
        m.d.comb += [biased.eq(value + self.bias),
                     scaled.eq(Mux(self.right, biased >> self.rs, value[:_BOUNDED_BITS].as_signed() << self.ls))]
        if registered >= 1:
            held = Signal.like(scaled, name="round_scaled_reg")
            m.d.sync += held.eq(scaled)
            scaled = held
        clipped = Signal(MANT_SHAPE, name="round_clipped")
        out = Signal(MANT_SHAPE, name="round_mantissa")
        m.d.comb += [clipped.eq(Mux(scaled > nx.MANT_MAX, nx.MANT_MAX, Mux(scaled < -nx.MANT_MAX, -nx.MANT_MAX, scaled))),
                     out.eq((clipped + self.ubias) >> self.urs)]
        if registered >= 2:
            held = Signal.like(out, name="round_mantissa_reg")
            m.d.sync += held.eq(out)
            out = held
        return out


class Requantizer(wiring.Component):
    """Two passes over ``len`` values read one per cycle (or ``lanes`` per cycle) from the unit that runs it.

    Pass 1 ORs the magnitudes together: the bit length of the OR is the bit length of the peak, which fixes the
    shift ``s = bitlen(peak) - MANT_BITS``. A command with ``fold`` skips pass 1 and takes that OR from ``peak``
    (a REQ after the GEMV that wrote its words and recorded it): ``len + latency`` cycles fewer. Pass 2 rounds each value half up by ``s`` (or shifts it left), clips
    to ``MANT_MAX``, and, when ``exp + s`` falls below ``EXP_MIN``, rounds again by the underflow; the mantissas
    are packed into activation-buffer words. ``exp + s > EXP_MAX`` completes with ``OVERFLOW`` and writes
    nothing. Each pass asks for value ``index`` with ``read``; the value must arrive on ``value`` ``latency``
    cycles later. Busy for ``2 * len + 5 + 2 * (latency - 1) + registered`` cycles (``2`` for ``len == 0``: all
    zero).

    Parameters
    ----------
    config : OverlayConfig
    width : int
        Bits of a (signed) value.
    latency : int
        Cycles from ``read`` to its value (1: a read port; more: the reading unit's pipeline registers). Each pass
        takes ``latency - 1`` cycles more.
    registered : int
        Registers in the second pass's round (0 to 2), one cycle more each: between the round-shift and the clip
        (as in :func:`~hw.normalize.mantissa`), so that neither half follows the reading unit's last register in
        the same cycle; then between the underflow round and the packer.
    lanes : int
        Values per read of a ``wide`` command: a read of ``index`` takes values ``index`` to ``index + lanes - 1``
        (those below ``len``) on ``value``'s lanes, and each pass takes ``ceil(len / lanes)`` reads; a command that
        is not wide reads one value per cycle on lane 0. The round has a datapath per lane.

    Attributes
    ----------
    cmd : In(stream.Signature(requant_command(config)))
        Taken while idle.
    index, read : Out
    value : In(signed(width)), or In(ArrayLayout(signed(width), lanes)) with several lanes
    peak : In(width)
        The OR of the values' magnitudes, taken with a ``fold`` command.
    abuf_w : Out(abuf_write(config))
    exp : Out(EREG_SHAPE)
        The vector's exponent, valid with a successful ``done``.
    done : Out(stream.Signature(Fault, always_ready=True))
        Pulses in the last busy cycle.
    """

    def __init__(self, config, width: int, *, latency: int = 1, registered: int = 0, lanes: int = 1):
        if latency < 1:
            self._MustUse__silence = True  # a rejected component is not an unused one
            raise ValueError(f"a value arrives at least one cycle after its read; got latency={latency!r}")
        if registered not in range(3):
            self._MustUse__silence = True
            raise ValueError(f"the round pass has 0 to 2 registers; got registered={registered!r}")
        self.config, self.width, self.latency, self.registered, self.lanes = config, width, latency, registered, lanes
        layout = requant_command(config, lanes)
        value = signed(width) if lanes == 1 else data.ArrayLayout(signed(width), lanes)
        # with lanes, the index runs up to len rounded up to them: a bit more, so that it does not wrap below len
        index = unsigned(Shape.cast(layout.members["len"]).width + (lanes > 1))
        super().__init__({"cmd": In(stream.Signature(layout)), "index": Out(index), "read": Out(1),
                          "value": In(value), "peak": In(width), "abuf_w": Out(abuf_write(config)),
                          "exp": Out(EREG_SHAPE),
                          "done": Out(stream.Signature(Fault, always_ready=True))})

    def elaborate(self, platform):
        m = Module()
        job = Signal.like(self.cmd.payload, name="job")
        n, idx = job.len, self.index
        lat, lanes = self.latency, self.lanes
        values = [self.value] if lanes == 1 else [self.value[i] for i in range(lanes)]
        # bit i: the value read i + 1 cycles ago (the last one, for rd_last); ``value`` holds it at bit lat - 1
        rd_valid = Signal(lat, name="read_valid")
        rd_last = Signal(lat, name="read_last")
        arrives, arrives_last = rd_valid[lat - 1], rd_last[lat - 1]
        issuing = Signal(name="issuing")
        m.d.comb += issuing.eq(idx < n)
        # the values a read takes and the lanes of them below len, as they arrive (lat cycles later)
        if lanes > 1:
            left = Signal.like(n, name="values_left")
            wide_mask = Signal(lanes, name="read_lanes")
            m.d.comb += [left.eq(n - idx), wide_mask.eq(Cat(left > i for i in range(lanes)))]
            step, read_mask = Mux(job.wide, lanes, 1), Mux(job.wide, wide_mask, 1)
            last_read = Mux(job.wide, left <= lanes, left == 1)
            rd_mask = [Signal(lanes, name=f"read_mask{i}") for i in range(lat)]
            m.d.sync += [rd_mask[0].eq(read_mask)] + [rd_mask[i].eq(rd_mask[i - 1]) for i in range(1, lat)]
            arrives_mask = rd_mask[-1]
        else:
            step, last_read, arrives_mask = 1, idx == n - 1, Const(1, 1)
        mags = []
        for i, v in enumerate(values):
            mags.append(mag := Signal(self.width, name=f"magnitude{i}"))
            m.d.comb += mag.eq(Mux(arrives_mask[i], Mux(v < 0, -v, v), 0))
        read_or = Signal(self.width, name="read_magnitudes")  # the OR of a read's magnitudes
        m.d.comb += read_or.eq(functools.reduce(operator.or_, mags))
        peak_or = Signal(self.width, name="peak_or")
        # the peak's bit length (a 64-bit priority encoder) has a state of its own, ahead of the exponent arithmetic
        bitlen = Signal(range(self.width + 1), name="peak_bits")
        e_out = Signal(signed(EREG_SHAPE.width + 2), name="exp_out")
        under = Signal(signed(EREG_SHAPE.width + 2), name="underflow")
        zero = Signal(name="all_zero")
        # pass 2 rereads pass 1's values (bounded); its shifts and rounding biases are registered in SHIFT
        shifts = _RoundShifts(self.width)
        mants = [shifts.mantissa(m, v, registered=self.registered) for v in values]
        mant_valid, mant_last, mant_mask = arrives, arrives_last, arrives_mask
        for i in range(self.registered):
            held_valid, held_last = Signal(name=f"mantissa_valid{i}"), Signal(name=f"mantissa_last{i}")
            held_mask = Signal(lanes, name=f"mantissa_lanes{i}")
            m.d.sync += [held_valid.eq(mant_valid), held_last.eq(mant_last), held_mask.eq(mant_mask)]
            mant_valid, mant_last, mant_mask = held_valid, held_last, held_mask
        m.submodules.packer = packer = WordPacker(self.config, lanes)
        wiring.connect(m, packer.abuf_w, wiring.flipped(self.abuf_w))
        m.d.comb += [packer.base.eq(job.dst), packer.lane.payload.value.eq(Cat(Mux(zero, 0, mant) for mant in mants)),
                     packer.lane.payload.last.eq(mant_last), self.exp.eq(Mux(zero | (under > 0), nx.EXP_MIN, e_out))]
        if lanes > 1:
            m.d.comb += [packer.wide.eq(job.wide), packer.lane.payload.mask.eq(mant_mask)]
        m.d.sync += [rd_valid.eq(Cat(self.read, rd_valid)), rd_last.eq(Cat(self.read & last_read, rd_last))]

        with m.FSM(name="requantizer_fsm"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                m.d.sync += [idx.eq(0), peak_or.eq(Mux(self.cmd.payload.fold, self.peak, 0)), bitlen.eq(0),
                             job.eq(self.cmd.payload)]
                with m.If(self.cmd.valid & (self.cmd.payload.len == 0)):
                    m.next = "SHIFT"
                with m.Elif(self.cmd.valid & self.cmd.payload.fold):
                    m.next = "PEAK_BITS"
                with m.Elif(self.cmd.valid):
                    m.next = "PEAK"
            with m.State("PEAK"):
                m.d.comb += self.read.eq(issuing)
                with m.If(issuing):
                    m.d.sync += idx.eq(idx + step)
                with m.If(arrives):
                    m.d.sync += peak_or.eq(peak_or | read_or)
                with m.If(arrives_last):
                    m.next = "PEAK_BITS"
            with m.State("PEAK_BITS"):
                m.d.sync += bitlen.eq(bit_length(m, peak_or, "peak_or_bits"))
                m.next = "SHIFT"
            with m.State("SHIFT"):
                s = bitlen - nx.MANT_BITS
                e = job.exp + s
                m.d.comb += packer.clear.eq(1)
                m.d.sync += [zero.eq((bitlen == 0) | (n == 0)), e_out.eq(e), under.eq(nx.EXP_MIN - e), idx.eq(0)]
                shifts.latch(m, s, nx.EXP_MIN - e)
                with m.If(n == 0):
                    m.next = "FINISH"
                with m.Elif((bitlen != 0) & (e > nx.EXP_MAX)):
                    m.next = "OVERFLOW"
                with m.Else():
                    m.next = "ROUND"
            with m.State("ROUND"):
                m.d.comb += [self.read.eq(issuing), packer.lane.valid.eq(mant_valid)]
                with m.If(issuing):
                    m.d.sync += idx.eq(idx + step)
                with m.If(mant_valid & mant_last):
                    m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += self.done.valid.eq(1)
                m.next = "IDLE"
            with m.State("OVERFLOW"):
                m.d.comb += [self.done.valid.eq(1), self.done.payload.eq(Fault.OVERFLOW)]
                m.next = "IDLE"
        return m


def add_requantizer(m: Module, unit, width: int, *, length, exp, dst, **kwargs) -> Requantizer:
    """A :class:`Requantizer` of *width*-bit values inside *unit*, writing its ``abuf_w``; its command takes
    *length* values at exponent *exp* to buffer word *dst* (the caller raises ``cmd.valid``, reads ``index`` and
    ``read`` and drives ``value``). *kwargs* go to the :class:`Requantizer` (``latency``, ``registered``)."""
    m.submodules.requantizer = rq = Requantizer(unit.config, width, **kwargs)
    wiring.connect(m, rq.abuf_w, wiring.flipped(unit.abuf_w))
    m.d.comb += [rq.cmd.payload.len.eq(length), rq.cmd.payload.exp.eq(exp), rq.cmd.payload.dst.eq(dst)]
    return rq


def complete_requantization(m: Module, seq, rq: Requantizer, ereg_w, addr):
    """The unit's state that waits for *rq*: when it is done, write the exponent to register *addr* (unless it
    failed) and complete the instruction with its fault."""
    with m.If(rq.done.valid):
        m.d.comb += [ereg_w.addr.eq(addr), ereg_w.data.eq(rq.exp), ereg_w.en.eq(rq.done.payload == Fault.NONE)]
        seq.complete(rq.done.payload)
