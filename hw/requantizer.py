"""Requantizer: wide values, one per cycle, into a bfp16 vector, bit-exact with :func:`kvoverlay.numerics.normalize`.

The REQ unit feeds it accumulator words, the LDROW unit dequantized weights (``q * scale``).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import numerics as nx

from .normalize import bit_length, scalar_mantissa
from .ports import EREG_SHAPE, Fault, abuf_write
from .unit import WordPacker

__all__ = ["Requantizer", "add_requantizer", "complete_requantization", "requant_command"]


def requant_command(config) -> data.StructLayout:
    """A requantization: ``len`` values, the exponent they are scaled by, the first activation-buffer word."""
    return data.StructLayout({"len": 16, "exp": EREG_SHAPE,
                              "dst": abuf_write(config).members["addr"].shape})


class Requantizer(wiring.Component):
    """Two passes over ``len`` values read one per cycle from the unit that runs it.

    Pass 1 ORs the magnitudes together: the bit length of the OR is the bit length of the peak, which fixes the
    shift ``s = bitlen(peak) - MANT_BITS``. Pass 2 rounds each value half up by ``s`` (or shifts it left), clips
    to ``MANT_MAX``, and, when ``exp + s`` falls below ``EXP_MIN``, rounds again by the underflow; the mantissas
    are packed into activation-buffer words. ``exp + s > EXP_MAX`` completes with ``OVERFLOW`` and writes
    nothing. Each pass asks for value ``index`` with ``read``; the value must arrive on ``value`` ``latency``
    cycles later. Busy for ``2 * len + 4 + 2 * (latency - 1) + registered`` cycles (``2`` for ``len == 0``: all
    zero).

    Parameters
    ----------
    config : OverlayConfig
    width : int
        Bits of a (signed) value.
    latency : int
        Cycles from ``read`` to its value (1: a read port; more: the reading unit's pipeline registers). Each pass
        takes ``latency - 1`` cycles more.
    registered : bool
        A register between the round-shift and the clip of the second pass (:func:`~hw.normalize.mantissa`),
        so that neither half follows the reading unit's last register in the same cycle; one cycle more.

    Attributes
    ----------
    cmd : In(stream.Signature(requant_command(config)))
        Taken while idle.
    index, read : Out
    value : In(signed(width))
    abuf_w : Out(abuf_write(config))
    exp : Out(EREG_SHAPE)
        The vector's exponent, valid with a successful ``done``.
    done : Out(stream.Signature(Fault, always_ready=True))
        Pulses in the last busy cycle.
    """

    def __init__(self, config, width: int, *, latency: int = 1, registered: bool = False):
        if latency < 1:
            self._MustUse__silence = True  # a rejected component is not an unused one
            raise ValueError(f"a value arrives at least one cycle after its read; got latency={latency!r}")
        self.config, self.width, self.latency, self.registered = config, width, latency, registered
        layout = requant_command(config)
        super().__init__({"cmd": In(stream.Signature(layout)), "index": Out(layout.members["len"]), "read": Out(1),
                          "value": In(signed(width)), "abuf_w": Out(abuf_write(config)), "exp": Out(EREG_SHAPE),
                          "done": Out(stream.Signature(Fault, always_ready=True))})

    def elaborate(self, platform):
        m = Module()
        job = Signal.like(self.cmd.payload, name="job")
        n, idx = job.len, self.index
        lat = self.latency
        # bit i: the value read i + 1 cycles ago (the last one, for rd_last); ``value`` holds it at bit lat - 1
        rd_valid = Signal(lat, name="read_valid")
        rd_last = Signal(lat, name="read_last")
        arrives, arrives_last = rd_valid[lat - 1], rd_last[lat - 1]
        issuing = Signal(name="issuing")
        m.d.comb += issuing.eq(idx < n)
        mag = Signal(self.width, name="magnitude")
        m.d.comb += mag.eq(Mux(self.value < 0, -self.value, self.value))
        peak_or = Signal.like(mag, name="peak_or")
        bitlen = bit_length(m, peak_or, "peak_bits")
        shift = Signal(signed(8), name="shift")
        e_out = Signal(signed(EREG_SHAPE.width + 2), name="exp_out")
        under = Signal(signed(EREG_SHAPE.width + 2), name="underflow")
        zero = Signal(name="all_zero")
        # pass 2 rereads pass 1's values (bounded)
        mant = scalar_mantissa(m, self.value, shift, under, "requant", bounded=True, registered=self.registered)
        mant_valid, mant_last = arrives, arrives_last
        if self.registered:
            mant_valid, mant_last = Signal(name="mantissa_valid"), Signal(name="mantissa_last")
            m.d.sync += [mant_valid.eq(arrives), mant_last.eq(arrives_last)]
        m.submodules.packer = packer = WordPacker(self.config)
        wiring.connect(m, packer.abuf_w, wiring.flipped(self.abuf_w))
        m.d.comb += [packer.base.eq(job.dst), packer.lane.payload.value.eq(Mux(zero, 0, mant)),
                     packer.lane.payload.last.eq(mant_last), self.exp.eq(Mux(zero | (under > 0), nx.EXP_MIN, e_out))]
        m.d.sync += [rd_valid.eq(Cat(self.read, rd_valid)), rd_last.eq(Cat(self.read & (idx == n - 1), rd_last))]

        with m.FSM(name="requantizer_fsm"):
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                m.d.sync += [idx.eq(0), peak_or.eq(0), job.eq(self.cmd.payload)]
                with m.If(self.cmd.valid & (self.cmd.payload.len == 0)):
                    m.next = "SHIFT"
                with m.Elif(self.cmd.valid):
                    m.next = "PEAK"
            with m.State("PEAK"):
                m.d.comb += self.read.eq(issuing)
                with m.If(issuing):
                    m.d.sync += idx.eq(idx + 1)
                with m.If(arrives):
                    m.d.sync += peak_or.eq(peak_or | mag)
                with m.If(arrives_last):
                    m.next = "SHIFT"
            with m.State("SHIFT"):
                s = bitlen - nx.MANT_BITS
                e = job.exp + s
                m.d.comb += packer.clear.eq(1)
                m.d.sync += [shift.eq(s), zero.eq((bitlen == 0) | (n == 0)), e_out.eq(e), under.eq(nx.EXP_MIN - e),
                             idx.eq(0)]
                with m.If(n == 0):
                    m.next = "FINISH"
                with m.Elif((bitlen != 0) & (e > nx.EXP_MAX)):
                    m.next = "OVERFLOW"
                with m.Else():
                    m.next = "ROUND"
            with m.State("ROUND"):
                m.d.comb += [self.read.eq(issuing), packer.lane.valid.eq(mant_valid)]
                with m.If(issuing):
                    m.d.sync += idx.eq(idx + 1)
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
