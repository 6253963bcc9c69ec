"""The access table: every operand field of every opcode is covered, with its length."""

import pytest

from kvoverlay import isa
from kvoverlay.access import SPACES, Access, accesses

REGISTER_FIELDS = ("row_reg", "rd", "pos_reg", "len_reg")


def distinct(op):
    """An instruction of *op* whose fields all hold different small values (so a mix-up shows)."""
    fields = {f.name: min(f.hi, 2 + i) * f.scale for i, f in enumerate(op.fields)}
    if "head_dim" in fields:
        fields["head_dim"] = 8
    return isa.Instr(op.name, fields)


@pytest.mark.parametrize("op", isa.OPCODES, ids=lambda op: op.name)
def test_every_operand_is_covered(op):
    ins = distinct(op)
    got = accesses(ins)
    assert all(isinstance(a, Access) and a.space in SPACES and a.lo < a.hi for a in got)
    for name in REGISTER_FIELDS:
        if name in ins.fields:
            assert Access("reg", ins.fields[name], ins.fields[name] + 1, name == "rd") in got
    vector_operands = [f.name for f in op.fields if f.name + "_e" in ins.fields]
    for name in vector_operands:
        space = "acc" if name == "acc" else "abuf"
        assert any(a.space == space and a.lo == ins.fields[name] for a in got), name
        e = ins.fields[name + "_e"]
        assert any(a.space == "ereg" and a.lo == e and a.hi == e + 1 for a in got), name


def test_gemv_reads_its_accumulators_only_when_accumulating():
    base = {"addr": 0, "rows": 16, "cols": 64, "fmt": 1, "lg_group": 0, "sexp": 0, "x": 4, "x_e": 1, "acc": 32,
            "acc_e": 2}
    fresh = accesses(isa.Instr("GEMV", {**base, "accumulate": 0}))
    summed = accesses(isa.Instr("GEMV", {**base, "accumulate": 1}))
    assert Access("abuf", 4, 68, False) in fresh
    assert Access("acc", 32, 48, True) in fresh and Access("acc", 32, 48, False) not in fresh
    assert Access("acc", 32, 48, False) in summed


def test_attention_lengths_follow_heads():
    f = {"q": 0, "q_e": 3, "dst": 100, "dst_e": 4, "kv_base": 0, "q_heads": 4, "kv_heads": 2, "head_dim": 16,
         "len_reg": 5, "len_imm": 0, "stats": 8}
    got = accesses(isa.Instr("ATTN", f))
    assert Access("abuf", 0, 64, False) in got and Access("abuf", 100, 164, True) in got
    assert Access("acc", 8, 16, True) in got
    assert accesses(isa.Instr("END", {})) == []
