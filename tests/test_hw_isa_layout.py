"""The Amaranth layouts agree with the Python encoder, field by field."""

import pytest
from kvoverlay.hw.isa_layout import LAYOUTS

from kvoverlay import isa


@pytest.mark.parametrize("op", isa.OPCODES, ids=lambda o: o.name)
def test_layout_matches_encoder(op):
    layout = LAYOUTS[op.name]
    assert layout.size == isa.INSN_BITS
    for extreme in ("lo", "hi"):
        fields = {f.name: getattr(f, extreme) * f.scale for f in op.fields}
        ins = isa.Instr(op.name, fields)
        const = layout.from_bits(isa.encode(ins))
        assert const.opcode == op.code
        for f in op.fields:
            assert const[f.name] == fields[f.name] // f.scale, f.name
        if "reserved" in layout.members:
            assert const.reserved == 0
