"""Elaboration-time integer helpers for sizing hardware (plain Python, no signals)."""

from __future__ import annotations

__all__ = ["address_bits", "ceil_div", "log2_exact"]


def log2_exact(n: int) -> int:
    """``log2(n)`` of a power of two; the lane and port geometries are powers of two by config validation."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"{n!r} is not a power of two")
    return n.bit_length() - 1


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers."""
    return -(-a // b)


def address_bits(n: int) -> int:
    """Address bits for *n* entries (at least one, so that no port is zero-width)."""
    return max(1, (n - 1).bit_length())
