"""Digit-by-digit integer square root, two radicand bits per cycle (``math.isqrt`` of :func:`kvoverlay.numerics.rsqrt`)."""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Isqrt"]


class Isqrt(wiring.Component):
    """``root = isqrt(radicand)`` for an unsigned radicand of ``2 * root_width`` bits.

    Takes exactly ``root_width`` busy cycles after ``start``, one root bit per cycle.

    Parameters
    ----------
    root_width : int
        Bits of the root.

    Attributes
    ----------
    start : In(1)
        Latches ``radicand``.
    radicand : In(2 * root_width)
    busy, done : Out(1)
        ``done`` pulses after the last step; ``root`` then holds until the next ``start``.
    root : Out(root_width)
    """

    def __init__(self, root_width: int):
        self.root_width = root_width
        super().__init__({
            "start": In(1),
            "radicand": In(2 * root_width),
            "busy": Out(1),
            "done": Out(1),
            "root": Out(root_width),
        })

    def elaborate(self, platform):
        m = Module()
        k = self.root_width
        pending = Signal(2 * k, name="radicand_left")  # radicand digits not yet consumed, top-aligned
        rem = Signal(k + 2, name="partial_rem")
        res = Signal(k, name="partial_root")
        count = Signal(range(k + 1), name="digits_left")
        cand = Signal(k + 3, name="cand")
        trial = Signal(k + 4, name="trial")
        m.d.comb += [
            cand.eq(rem << 2 | pending[-2:]),
            trial.eq(cand - (res << 2 | 1)),
            self.root.eq(res),
        ]
        m.d.sync += self.done.eq(0)
        with m.If(self.start):
            m.d.sync += [pending.eq(self.radicand), rem.eq(0), res.eq(0), count.eq(k), self.busy.eq(1)]
        with m.Elif(self.busy):
            m.d.sync += [pending.eq(pending << 2), count.eq(count - 1)]
            with m.If(trial[-1]):
                m.d.sync += [rem.eq(cand), res.eq(res << 1)]
            with m.Else():
                m.d.sync += [rem.eq(trial), res.eq(res << 1 | 1)]
            with m.If(count == 1):
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        return m
