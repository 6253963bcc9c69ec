"""Amaranth layouts of the ISA, generated from :mod:`kvoverlay.isa`.

One :class:`~amaranth.lib.data.StructLayout` per opcode, each exactly
``INSN_BITS`` wide, so the decoder views one instruction word through the
layout of its opcode. Nothing here restates a field: names, widths, order and
signedness all come from the ISA table.
"""

from amaranth.hdl import signed, unsigned
from amaranth.lib import data

from kvoverlay import isa

__all__ = ["HEADER_LAYOUT", "LAYOUTS", "instr_layout"]

#: Opcode and token flags, common to every instruction.
HEADER_LAYOUT = data.StructLayout({"opcode": unsigned(isa.OPCODE_BITS), **{d: unsigned(1) for d in isa.DEP_FLAGS}})


def instr_layout(op: isa.OpFormat) -> data.StructLayout:
    """The layout of one opcode: header, fields in declaration order, reserved bits."""
    members = dict(HEADER_LAYOUT.members)
    for f in op.fields:
        members[f.name] = signed(f.bits) if f.signed else unsigned(f.bits)
    if op.used_bits < isa.INSN_BITS:
        members["reserved"] = unsigned(isa.INSN_BITS - op.used_bits)
    return data.StructLayout(members)


LAYOUTS = {op.name: instr_layout(op) for op in isa.OPCODES}
