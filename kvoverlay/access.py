"""What each instruction reads and writes on chip, and how much: the access table, declared once.

The golden model's timing replay uses it to find races between queues that no dependency token
orders; the compiler's scheduler uses it to place exactly the tokens that order them. This module
imports nothing but :mod:`kvoverlay.isa`.
"""

from __future__ import annotations

from typing import NamedTuple

from kvoverlay import isa

__all__ = ["SPACES", "Access", "accesses"]

#: The on-chip spaces: activation-buffer and accumulator words, exponent and scalar registers.
SPACES = ("abuf", "acc", "ereg", "reg")


class Access(NamedTuple):
    """One instruction's use of the half-open range ``[lo, hi)`` of one on-chip *space*."""

    space: str
    lo: int
    hi: int
    write: bool


def accesses(ins: isa.Instr) -> list[Access]:
    """The on-chip ranges that *ins* reads and writes.

    A vector operand (an activation-buffer address field ``x`` with exponent register ``x_e``)
    covers its words and its exponent register; an accumulator operand covers its words and, where
    named, the exponent register that travels with them.
    """
    f, op, out = ins.fields, ins.op, []

    def vec(name, n, write=False):
        out.append(Access("abuf", f[name], f[name] + n, write))
        if name + "_e" in f:
            out.append(Access("ereg", f[name + "_e"], f[name + "_e"] + 1, write))

    def acc(name, n, write=False, ereg=None):
        out.append(Access("acc", f[name], f[name] + n, write))
        if ereg is not None:
            out.append(Access("ereg", f[ereg], f[ereg] + 1, write))

    def reg(name, write=False):
        out.append(Access("reg", f[name], f[name] + 1, write))

    if op == "LOAD":
        vec("dst", f["len"], True)
    elif op == "LDROW":
        reg("row_reg")
        vec("dst", f["cols"], True)
    elif op == "STORE":
        vec("src", f["len"])
    elif op == "STACC":
        acc("acc", f["len"])
    elif op == "GEMV":
        vec("x", f["cols"])
        if f["accumulate"]:
            acc("acc", f["rows"], False, "acc_e")
        acc("acc", f["rows"], True, "acc_e")
    elif op == "REQ":
        acc("acc", f["len"], False, "acc_e")
        vec("dst", f["len"], True)
    elif op in ("VADD", "VMUL"):
        vec("a", f["len"]), vec("b", f["len"]), vec("dst", f["len"], True)
    elif op == "VSCALE":
        vec("a", f["len"]), vec("dst", f["len"], True)
    elif op == "NORM":
        vec("x", f["len"]), vec("g", f["len"]), vec("dst", f["len"], True)
    elif op == "ACT":
        vec("x", f["len"]), vec("dst", f["len"], True)
    elif op == "ROPE":
        n, half = f["heads"] * f["head_dim"], f["head_dim"] // 2
        vec("x", n), vec("cos", half), vec("sin", half), vec("dst", n, True)
    elif op == "ARGMAX":
        vec("x", f["len"])
        reg("rd", True)
    elif op == "ARGMAXACC":
        acc("acc", f["len"])
        reg("rd", True)
    elif op == "KVAPPEND":
        n = f["heads"] * f["head_dim"]
        vec("k", n), vec("v", n)
        reg("pos_reg")
    elif op == "ATTN":
        n = f["q_heads"] * f["head_dim"]
        vec("q", n), vec("dst", n, True)
        if f["stats"] != isa.ATTN_NO_STATS:
            acc("stats", 2 * f["q_heads"], True)
        reg("len_reg")
    return out
