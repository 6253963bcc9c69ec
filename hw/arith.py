"""Arithmetic pieces sized for the ECP5's multipliers (MULT18X18D: 18 x 18 signed)."""

from __future__ import annotations

from amaranth.hdl import Mux, Value

__all__ = ["narrow_times"]


def narrow_times(a, b):
    """``a * b`` for a signed *a* of a few bits, as shift-and-add, so that Yosys leaves it in logic: its ECP5
    multiplier mapping takes any product of 2 x 2 bits or more, and a MULT18X18D spent on a 2- or 4-bit factor
    is a waste. Returns a signed expression."""
    a = Value.cast(a)
    total = 0
    for k in range(len(a)):
        term = Mux(a[k], Value.cast(b) << k, 0)
        total = total - term if k == len(a) - 1 else total + term
    return total
