"""Digit-by-digit integer square root (``math.isqrt`` of :func:`kvoverlay.numerics.rsqrt`), several root bits per cycle."""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .divider import restoring_step, run_steps

__all__ = ["Isqrt"]


class Isqrt(wiring.Component):
    """``root = isqrt(radicand)`` for an unsigned radicand of ``2 * root_width`` bits.

    Each step consumes two radicand bits and yields one root bit; ``bits_per_cycle`` steps
    are chained per cycle, so a root takes exactly :func:`kvoverlay.timing.isqrt_cycles` busy cycles.

    Parameters
    ----------
    root_width : int
        Bits of the root.
    bits_per_cycle : int
        Root bits per cycle.

    Attributes
    ----------
    start : In(1)
        Latches ``radicand``.
    radicand : In(2 * root_width)
    busy, done : Out(1)
        ``done`` pulses after the last step; ``root`` then holds until the next ``start``.
    root : Out(root_width)
    """

    def __init__(self, root_width: int, bits_per_cycle: int = 1):
        self.root_width = root_width
        self.bits_per_cycle = bits_per_cycle
        super().__init__({
            "start": In(1),
            "radicand": In(2 * root_width),
            "busy": Out(1),
            "done": Out(1),
            "root": Out(root_width),
        })

    def elaborate(self, platform):
        m = Module()
        k = self.bits_per_cycle
        steps = -(-self.root_width // k) * k  # leading zero digits do not change the root
        pending = Signal(2 * steps, name="radicand_left")  # digits not yet consumed, top-aligned
        rem = Signal(self.root_width + 2, name="partial_rem")
        res = Signal(self.root_width, name="partial_root")
        count = Signal(range(steps // k + 1), name="steps_left")
        m.d.comb += self.root.eq(res)
        r, q = rem, res
        for i in range(k):
            cand = Signal(self.root_width + 3, name=f"cand{i}")
            m.d.comb += cand.eq(r << 2 | pending[2 * steps - 2 - 2 * i: 2 * steps - 2 * i])
            r, q = restoring_step(m, cand, q << 2 | 1, self.root_width + 2, q, str(i))
        run_steps(m, self, count, [pending.eq(self.radicand), rem.eq(0), res.eq(0)], steps // k,
                  [pending.eq(pending << 2 * k), rem.eq(r), res.eq(q)])
        return m
