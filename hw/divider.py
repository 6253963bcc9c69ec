"""Restoring divider, ``bits_per_cycle`` quotient bits per cycle, as :func:`kvoverlay.numerics.rsqrt` and NORM require.

The divider and the square root (:mod:`hw.isqrt`) are the same digit recurrence: each step shifts the next digits
of the operand into a partial remainder, subtracts a trial value unless that goes negative, and appends the
result bit. :func:`restoring_step` is one step and :func:`run_steps` the start/busy/done sequencing around them.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Divider", "Multiplier", "restoring_step", "run_steps"]


def restoring_step(m: Module, cand, subtrahend, rem_width: int, result, name: str):
    """One restoring step: the remainder is ``cand - subtrahend`` unless that is negative (then ``cand``), and the
    result gains a 1 bit where the subtraction was kept. Returns the next (remainder, result) signals."""
    trial = Signal(len(cand) + 1, name=f"trial{name}")
    m.d.comb += trial.eq(cand - subtrahend)
    restore = trial[-1]
    rem = Signal(rem_width, name=f"rem_step{name}")
    res = Signal(len(result), name=f"result_step{name}")
    m.d.comb += [rem.eq(Mux(restore, cand, trial)), res.eq(result << 1 | ~restore)]
    return rem, res


def run_steps(m: Module, unit, count, load, cycles, advance, *, empty=None):
    """Sequencing of a multi-cycle recurrence on *unit*'s ``start``, ``busy`` and ``done``.

    ``start`` runs the statements *load* and sets *count* to *cycles*; each following cycle runs *advance*, until
    ``done`` pulses in the cycle after the last. With *empty* true at ``start`` there is nothing to do: ``done``
    pulses in the next cycle.
    """
    m.d.sync += unit.done.eq(0)
    with m.If(unit.start):
        m.d.sync += [*load, count.eq(cycles), unit.busy.eq(1)]
        if empty is not None:
            with m.If(empty):
                m.d.sync += [unit.busy.eq(0), unit.done.eq(1)]
    with m.Elif(unit.busy):
        m.d.sync += [*advance, count.eq(count - 1)]
        with m.If(count == 1):
            m.d.sync += [unit.busy.eq(0), unit.done.eq(1)]


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
    bit_counts : sequence of int, optional
        The only values of ``bits`` the caller starts a division with (NORM's four divisions): the numerator is then
        aligned by a multiplexer of those few shifts rather than by a barrel shifter over every ``bits``. A division
        started with another ``bits`` gives a quotient of 0 (and takes the same cycles). Default: any ``bits``.

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

    def __init__(self, num_width: int, den_width: int, bits_per_cycle: int = 1, *, bit_counts=None):
        if bits_per_cycle < 1 or bits_per_cycle & (bits_per_cycle - 1):
            self._MustUse__silence = True
            raise ValueError(f"bits_per_cycle={bits_per_cycle} must be a power of two")
        if bit_counts is not None and not all(1 <= b <= num_width for b in bit_counts):
            self._MustUse__silence = True
            raise ValueError(f"bit_counts={bit_counts!r} must lie in [1, num_width={num_width}]")
        self.num_width = num_width
        self.den_width = den_width
        self.bits_per_cycle = bits_per_cycle
        self.bit_counts = None if bit_counts is None else tuple(sorted(set(bit_counts)))
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
            m.d.comb += cand.eq(r << 1 | dividend[width - 1 - i])
            r, q = restoring_step(m, cand, den, self.den_width + 1, q, str(i))
        aligned = Signal(width, name="numerator_aligned")
        if self.bit_counts is None:
            m.d.comb += aligned.eq(self.numerator << align)
        else:  # a few fixed alignments: a multiplexer instead of a shifter over width + 1 amounts
            with m.Switch(self.bits):
                for b in self.bit_counts:
                    with m.Case(b):
                        m.d.comb += aligned.eq(self.numerator[:b] << (width - -(-b // k) * k))
        run_steps(m, self, count,
                  [dividend.eq(aligned), den.eq(self.denominator), rem.eq(0), quo.eq(0)], padded // k,
                  [dividend.eq(dividend << k), rem.eq(r), quo.eq(q)], empty=self.bits == 0)
        return m


class Multiplier(wiring.Component):
    """Unsigned ``product = a * b`` by shift and add, ``bits_per_cycle`` bits of ``b`` per cycle (most significant
    first), so a product takes exactly :func:`kvoverlay.timing.multiplier_cycles` busy cycles: NORM's scalar
    products run here, time-multiplexed on one adder, instead of on wide multipliers that sit idle but for a few
    cycles per instruction.

    Parameters
    ----------
    a_width, b_width : int
        Widest operands.
    bits_per_cycle : int
        Bits of ``b`` consumed per cycle.

    Attributes
    ----------
    start : In(1)
        Latches ``a`` and ``b``.
    a, b : In
    busy, done : Out(1)
        ``done`` pulses after the last step; ``product`` then holds until the next ``start``.
    product : Out(a_width + b_width)
    """

    def __init__(self, a_width: int, b_width: int, bits_per_cycle: int = 1):
        if bits_per_cycle < 1:
            self._MustUse__silence = True
            raise ValueError(f"bits_per_cycle={bits_per_cycle} must be at least 1")
        self.a_width = a_width
        self.b_width = b_width
        self.bits_per_cycle = bits_per_cycle
        super().__init__({
            "start": In(1),
            "a": In(a_width),
            "b": In(b_width),
            "busy": Out(1),
            "done": Out(1),
            "product": Out(a_width + b_width),
        })

    def elaborate(self, platform):
        m = Module()
        k = self.bits_per_cycle
        width = -(-self.b_width // k) * k
        count = Signal(range(width // k + 1), name="steps_left")
        mcand = Signal(self.a_width, name="multiplicand")
        mplier = Signal(width, name="multiplier_left")  # bits of b not yet consumed, top-aligned
        acc = Signal(self.a_width + self.b_width, name="partial_product")
        addend = sum(Mux(mplier[width - k + i], mcand << i, 0) for i in range(k))
        m.d.comb += self.product.eq(acc)
        run_steps(m, self, count, [mcand.eq(self.a), mplier.eq(self.b), acc.eq(0)], width // k,
                  [acc.eq((acc << k) + addend), mplier.eq(mplier << k)])
        return m
