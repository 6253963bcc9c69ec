"""Arithmetic pieces sized for the ECP5's multipliers (MULT18X18D: 18 x 18 signed)."""

from __future__ import annotations

from amaranth.hdl import Mux, Value

__all__ = ["balanced_sum", "narrow_times"]


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


def balanced_sum(terms):
    """The sum of *terms* as a balanced tree of adders: Python's ``sum`` nests one expression per term, which
    past about a thousand terms (a u280 port's byte strobes) overflows the recursion of Amaranth's checks."""
    terms = list(terms)
    while len(terms) > 1:
        terms = [terms[k] + terms[k + 1] if k + 1 < len(terms) else terms[k] for k in range(0, len(terms), 2)]
    return terms[0] if terms else 0
