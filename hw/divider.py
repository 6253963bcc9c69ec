"""Restoring divider, ``bits_per_cycle`` quotient bits per cycle, as :func:`kvoverlay.numerics.rsqrt` and NORM require."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Divider"]


class Divider(wiring.Component):
    """Unsigned ``quotient = numerator // denominator`` and the remainder, by restoring division.

    The numerator's low ``bits`` bits are divided, ``bits_per_cycle`` quotient bits per
    cycle (restoring steps chained in one cycle), so a division takes exactly
    :func:`kvoverlay.timing.divider_cycles` busy cycles after ``start``, whatever the operands. A zero
    denominator gives an all-ones quotient; callers never divide by zero.

    Parameters
    ----------
    num_width : int
        Widest numerator.
    den_width : int
        Widest denominator.
    bits_per_cycle : int
        Restoring steps per cycle (a power of two).

    Attributes
    ----------
    start : In(1)
        Latches ``numerator``, ``denominator`` and ``bits``.
    numerator, denominator : In
        Operands.
    bits : In(range(num_width + 1))
        Significant numerator bits; higher bits must be zero.
    busy, done : Out(1)
        ``done`` pulses in the cycle after the last step, with the results valid
        from then until the next ``start``.
    quotient, remainder : Out
        Results.
    """

    def __init__(self, num_width: int, den_width: int, bits_per_cycle: int = 1):
        if bits_per_cycle < 1 or bits_per_cycle & (bits_per_cycle - 1):
            self._MustUse__silence = True
            raise ValueError(f"bits_per_cycle={bits_per_cycle} must be a power of two")
        self.num_width = num_width
        self.den_width = den_width
        self.bits_per_cycle = bits_per_cycle
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
        k = self.bits_per_cycle
        width = -(-self.num_width // k) * k  # leading zero bits do not change the quotient
        count = Signal(range(width // k + 1), name="steps_left")
        dividend = Signal(width, name="dividend")  # numerator bits not yet consumed, top-aligned
        den = Signal(self.den_width, name="den")
        rem = Signal(self.den_width + 1, name="partial_rem")
        quo = Signal(self.num_width, name="quo")
        padded = Signal(range(width + 1), name="bits_padded")
        align = Signal(range(width + 1), name="align")
        m.d.comb += [
            padded.eq((self.bits + k - 1) & ~(k - 1)),
            align.eq(width - padded),
            self.quotient.eq(quo),
            self.remainder.eq(rem),
        ]
        r, q = rem, quo
        for i in range(k):
            cand = Signal(self.den_width + 2, name=f"cand{i}")
            trial = Signal(self.den_width + 2, name=f"trial{i}")
            m.d.comb += [cand.eq(r << 1 | dividend[width - 1 - i]), trial.eq(cand - den)]
            keep = trial[-1]  # negative: restore
            r_next = Signal(self.den_width + 1, name=f"rem_step{i}")
            q_next = Signal(self.num_width, name=f"quo_step{i}")
            m.d.comb += [r_next.eq(Mux(keep, cand, trial)), q_next.eq(q << 1 | ~keep)]
            r, q = r_next, q_next
        m.d.sync += self.done.eq(0)
        with m.If(self.start):
            m.d.sync += [
                dividend.eq(self.numerator << align),
                den.eq(self.denominator), rem.eq(0), quo.eq(0), count.eq(padded // k), self.busy.eq(1),
            ]
            with m.If(self.bits == 0):
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        with m.Elif(self.busy):
            m.d.sync += [dividend.eq(dividend << k), count.eq(count - 1), rem.eq(r), quo.eq(q)]
            with m.If(count == 1):
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        return m
