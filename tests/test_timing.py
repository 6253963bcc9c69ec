"""The timing declaration: every opcode of the ISA has a busy-cycle formula, and nothing else has one."""

import pytest

from kvoverlay import isa, timing
from kvoverlay.config import load_config


def test_every_opcode_has_a_formula_and_no_other():
    assert set(timing._UNIT_CYCLES) == {op.name for op in isa.OPCODES}


def test_an_opcode_without_a_unit_is_refused_by_name():
    ins = isa.Instr("BOGUS")
    with pytest.raises(ValueError, match="'BOGUS' has no execution unit"):
        timing.unit_cycles(load_config("tiny"), ins)
