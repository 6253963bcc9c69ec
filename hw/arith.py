"""Arithmetic pieces sized for the ECP5's multipliers (MULT18X18D: 18 x 18 signed)."""

from __future__ import annotations

from amaranth.hdl import Mux, Value

__all__ = ["narrow_times"]


def narrow_times(a, b):
    """``a * b`` for an *a* of a few bits (signed or not), as shift-and-add, so that Yosys leaves it in logic: its
    ECP5 multiplier mapping takes any product of 2 x 2 bits or more, and a MULT18X18D spent on a narrow factor
    is a waste."""
    a = Value.cast(a)
    total = 0
    for k in range(len(a)):
        term = Mux(a[k], Value.cast(b) << k, 0)
        total = total - term if k == len(a) - 1 and a.shape().signed else total + term
    return total
