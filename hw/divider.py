"""Restoring divider: one quotient bit per cycle, as :func:`kvoverlay.numerics.rsqrt` and NORM require."""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Divider"]


class Divider(wiring.Component):
    """Unsigned ``quotient = numerator // denominator`` and the remainder, by restoring division.

    The numerator's low ``bits`` bits are divided, one quotient bit per cycle, so a
    division takes exactly ``bits`` busy cycles after ``start`` (deterministic, whatever
    the operands). A zero denominator gives an all-ones quotient; callers never divide by zero.

    Parameters
    ----------
    num_width : int
        Widest numerator.
    den_width : int
        Widest denominator.

    Attributes
    ----------
    start : In(1)
        Latches ``numerator``, ``denominator`` and ``bits``.
    numerator, denominator : In
        Operands.
    bits : In(range(num_width + 1))
        Significant numerator bits (iterations); higher bits must be zero.
    busy, done : Out(1)
        ``done`` pulses in the cycle after the last iteration, with the results valid
        from then until the next ``start``.
    quotient, remainder : Out
        Results.
    """

    def __init__(self, num_width: int, den_width: int):
        self.num_width = num_width
        self.den_width = den_width
        super().__init__({
            "start": In(1),
            "numerator": In(num_width),
            "denominator": In(den_width),
            "bits": In(range(num_width + 1)),
            "busy": Out(1),
            "done": Out(1),
            "quotient": Out(num_width),
            "remainder": Out(den_width),
        })

    def elaborate(self, platform):
        m = Module()
        count = Signal(range(self.num_width + 1), name="bits_left")
        dividend = Signal(self.num_width, name="dividend")  # numerator bits not yet consumed, top-aligned
        den = Signal(self.den_width, name="den")
        rem = Signal(self.den_width + 1, name="partial_rem")
        quo = Signal(self.num_width, name="quo")
        trial = Signal(self.den_width + 2, name="trial")
        m.d.comb += [
            trial.eq((rem << 1 | dividend[-1]) - den),
            self.quotient.eq(quo),
            self.remainder.eq(rem),
        ]
        align = Signal(range(self.num_width + 1), name="align")
        m.d.comb += align.eq(self.num_width - self.bits)
        m.d.sync += self.done.eq(0)
        with m.If(self.start):
            m.d.sync += [
                dividend.eq(self.numerator << align),
                den.eq(self.denominator), rem.eq(0), quo.eq(0), count.eq(self.bits), self.busy.eq(1),
            ]
            with m.If(self.bits == 0):
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        with m.Elif(self.busy):
            m.d.sync += [dividend.eq(dividend << 1), count.eq(count - 1)]
            with m.If(trial[-1]):  # negative: restore
                m.d.sync += [rem.eq(rem << 1 | dividend[-1]), quo.eq(quo << 1)]
            with m.Else():
                m.d.sync += [rem.eq(trial), quo.eq(quo << 1 | 1)]
            with m.If(count == 1):
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        return m
