"""Digit-by-digit integer square root (``math.isqrt`` of :func:`kvoverlay.numerics.rsqrt`), several root bits per cycle."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

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
            trial = Signal(self.root_width + 4, name=f"trial{i}")
            m.d.comb += [
                cand.eq(r << 2 | pending[2 * steps - 2 - 2 * i: 2 * steps - 2 * i]),
                trial.eq(cand - (q << 2 | 1)),
            ]
            keep = trial[-1]
            r_next = Signal(self.root_width + 2, name=f"rem_step{i}")
            q_next = Signal(self.root_width, name=f"root_step{i}")
            m.d.comb += [r_next.eq(Mux(keep, cand, trial)), q_next.eq(q << 1 | ~keep)]
            r, q = r_next, q_next
        m.d.sync += self.done.eq(0)
        with m.If(self.start):
            m.d.sync += [pending.eq(self.radicand), rem.eq(0), res.eq(0), count.eq(steps // k), self.busy.eq(1)]
        with m.Elif(self.busy):
            m.d.sync += [pending.eq(pending << 2 * k), count.eq(count - 1), rem.eq(r), res.eq(q)]
            with m.If(count == 1):
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
        return m
