"""Activation gates from piecewise-linear tables, bit-exact with :func:`kvoverlay.numerics.act`.

The tables are :data:`kvoverlay.numerics.GATE_TABLES`, in the order of ``isa.ENUMS["func"]``,
read at elaboration; each ROM word holds a segment's start value and its slope (the
difference to the next entry), so one read per lane interpolates.
"""

from __future__ import annotations

import math

from amaranth.hdl import Cat, Module, Mux, Shape, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa
from kvoverlay import numerics as nx

from .normalize import round_shift_expr
from .ports import EREG_SHAPE

__all__ = ["GATE_SHAPE", "LATENCY", "GateLut"]

#: Q1.15 gate values, including GATE_ONE.
GATE_SHAPE = Shape.cast(range(nx.GATE_ONE + 1))
#: Cycles from a lane's input to its gate: the table's read, the interpolation's product, its rounding and add.
LATENCY = 3
_LIMIT = nx.ACT_RANGE << nx.ACT_FRAC  # |x| in Q.ACT_FRAC at which the tables end
_SEG_BITS = nx._ACT_SHIFT  # fraction bits below a table segment (numerics private, read not restated)
_IDX_BITS = (2 * _LIMIT - 1).bit_length() - _SEG_BITS
# A fixed-point shift beyond this many bits either way already saturates (left) or gives 0 (right).
_SHIFT_CAP = _LIMIT.bit_length()


def _rom_layout():
    tables = [nx.GATE_TABLES[name] for name in isa.ENUMS["func"]]
    lo = min(int(t.min()) for t in tables)
    hi = max(int(t.max()) for t in tables)
    diffs = [int(d) for t in tables for d in (t[1:] - t[:-1])]
    base_shape = Shape.cast(range(lo, hi + 1))
    slope_shape = Shape.cast(range(min(diffs + [0]), max(diffs + [0]) + 1))
    return tables, data.StructLayout({"base": base_shape, "slope": slope_shape})


class GateLut(wiring.Component):
    """``gate(x)`` for ``lanes`` int16 mantissas with exponent ``exp``; result :data:`LATENCY` cycles later.

    Per lane: ``xf = round_shift(x, -(exp + ACT_FRAC))``, the table position
    ``clip(xf + ACT_RANGE << ACT_FRAC, 0, 2 * ACT_RANGE << ACT_FRAC - 1)``, a ROM read of
    the segment, and the interpolation ``base + round_shift(slope * frac, seg_bits)``;
    ``GATE_ONE`` at and above the table's top, registered (the ROM's clock-to-out and the interpolation's product
    end in a register of their own, its rounding and add in another, neither in the multiplier that takes the gate). Left shifts are exact up to the point
    where every nonzero input saturates; see the vector unit's notes on exponents above 35.

    Parameters
    ----------
    lanes : int
        Gates per cycle.

    Attributes
    ----------
    x : In(ArrayLayout(signed(16), lanes))
        Mantissas.
    exp : In(EREG_SHAPE)
        Their shared exponent.
    func : In(2)
        ``isa.ENUMS["func"]`` code.
    gate : Out(ArrayLayout(GATE_SHAPE, lanes))
        Gates of the inputs presented :data:`LATENCY` cycles earlier.
    """

    def __init__(self, lanes: int):
        self.lanes = lanes
        self.tables, self.rom_layout = _rom_layout()
        super().__init__({
            "x": In(data.ArrayLayout(signed(16), lanes)),
            "exp": In(EREG_SHAPE),
            "func": In(range(len(isa.ENUMS["func"]))),
            "gate": Out(data.ArrayLayout(GATE_SHAPE, lanes)),
        })

    def elaborate(self, platform):
        m = Module()
        segs = nx.ACT_SEGMENTS
        init = []
        for t in self.tables:
            for i in range(segs):
                init.append({"base": int(t[i]), "slope": int(t[i + 1] - t[i])})
        m.submodules.gate_rom = rom = Memory(shape=self.rom_layout, depth=len(init), init=init)
        shift = Signal(signed(len(self.exp) + 2), name="fixed_shift")
        m.d.comb += shift.eq(-(self.exp + nx.ACT_FRAC))
        func_bits = max(1, math.ceil(math.log2(len(self.tables))))
        assert segs == 1 << _IDX_BITS
        # A right shift leaves |xf| <= 2**15 < _LIMIT, inside the table. A left shift by ls leaves the table when
        # x >= ceil(_LIMIT / 2**ls) (above) or x < -_LIMIT / 2**ls (below): two thresholds that depend on the
        # exponent alone, shared by the lanes, so each lane shifts only the bits of a position inside the table
        ls = Signal(range(_SHIFT_CAP + 1), name="left_shift")
        above = Signal(range(_LIMIT + 1), name="above_from")
        below = Signal(range(_LIMIT + 1), name="below_under")
        m.d.comb += ls.eq(Mux(shift < -_SHIFT_CAP, _SHIFT_CAP, Mux(shift < 0, -shift, 0)))
        with m.Switch(ls):
            for k in range(_SHIFT_CAP + 1):
                with m.Case(k):
                    m.d.comb += [above.eq(max(1, _LIMIT >> k)), below.eq(_LIMIT >> k)]
        pos_bits = (2 * _LIMIT - 1).bit_length()
        for i in range(self.lanes):
            x = self.x[i]
            xf = round_shift_expr(m, x, shift, _SHIFT_CAP, _SHIFT_CAP, f"x_fixed{i}", out_bits=pos_bits)
            top = Signal(name=f"table_above{i}")
            bottom = Signal(name=f"table_below{i}")
            m.d.comb += [top.eq((ls != 0) & (x >= above)), bottom.eq((ls != 0) & (x < -below))]
            pos = Signal(range(2 * _LIMIT), name=f"table_pos{i}")
            m.d.comb += pos.eq(Mux(bottom, 0, Mux(top, 2 * _LIMIT - 1, xf + _LIMIT)))
            port = rom.read_port()
            m.d.comb += port.addr.eq(Cat(pos[_SEG_BITS:], self.func[:func_bits]))
            frac = Signal(_SEG_BITS, name=f"seg_frac{i}")
            saturated = Signal(name=f"gate_saturated{i}")
            m.d.sync += [frac.eq(pos[:_SEG_BITS]), saturated.eq(top)]
            # slope * frac on a multiplier (a MULT18X18D per lane): in logic it was a 7-term adder tree of ~130 LUT4
            # per lane, and the ulx3s preset has multipliers to spare at 4 lanes, not LUTs (docs/boards.md). The
            # product is registered with the segment's base: the block RAM's clock-to-out and the multiplier end in
            # a register, the rounding and the add to the base take the next cycle (50 MHz: docs/boards.md, vecfmax)
            prod = Signal(signed(self.rom_layout["slope"].shape.width + _SEG_BITS + 1), name=f"gate_prod{i}")
            base = Signal(self.rom_layout["base"].shape, name=f"gate_base{i}")
            held = Signal(name=f"gate_saturated_reg{i}")
            m.d.sync += [prod.eq(frac * port.data.slope), base.eq(port.data.base), held.eq(saturated)]
            step = Signal(signed(len(prod) - _SEG_BITS + 1), name=f"gate_step{i}")
            m.d.comb += step.eq((prod + (1 << (_SEG_BITS - 1))) >> _SEG_BITS)
            m.d.sync += self.gate[i].eq(Mux(held, nx.GATE_ONE, base + step))
        return m
