"""ISA table: encode/decode/assemble round trips, reserved encodings, error messages, docs page."""

from pathlib import Path

import pytest

from kvoverlay import isa
from kvoverlay.isa import BY_NAME, DEP_FLAGS, OPCODES, Instr, IsaError

ROOT = Path(__file__).resolve().parent.parent


def legal_deps(op):
    """Dependency flags legal for *op* (NOP: in the compute queue, where every flag is legal)."""
    queue = "compute" if op.queue == "any" else op.queue
    if queue == "front":
        return ()
    if queue == "load":
        return tuple(d for d in DEP_FLAGS if not d.endswith("_prev"))
    if queue == "store":
        return tuple(d for d in DEP_FLAGS if not d.endswith("_next"))
    return DEP_FLAGS


def extreme(op, which, deps=frozenset()):
    fields = {f.name: (f.lo if which == "lo" else f.hi) * f.scale for f in op.fields}
    if op.name == "NOP" and deps:
        fields["queue"] = isa.ENUMS["queue"].index("compute")
    return Instr(op.name, fields, frozenset(deps))


CASES = [(op.name, which, dep) for op in OPCODES for which in ("lo", "hi") for dep in (None, *legal_deps(op))]


@pytest.mark.parametrize("name,which,dep", CASES, ids=[f"{n}-{w}-{d or 'nodep'}" for n, w, d in CASES])
def test_round_trip_extremes(name, which, dep):
    op = BY_NAME[name]
    ins = extreme(op, which, {dep} if dep else set())
    word = isa.encode(ins)
    assert 0 <= word < 1 << isa.INSN_BITS
    assert word & 0x3F == op.code
    assert isa.decode(word) == ins
    blob = isa.encode_program([ins])
    assert len(blob) == isa.INSN_BYTES
    assert isa.decode_program(blob) == [ins]
    text = isa.disassemble([ins])
    assert isa.assemble(text) == [ins]
    assert isa.encode_program(isa.assemble(text)) == blob


def test_all_deps_at_once_round_trip():
    for op in OPCODES:
        ins = extreme(op, "hi", set(legal_deps(op)))
        assert isa.decode(isa.encode(ins)) == ins
        assert isa.assemble(isa.disassemble([ins])) == [ins]


def test_fields_do_not_overlap():
    for op in OPCODES:
        seen = 0
        for f in op.fields:
            mask = ((1 << f.bits) - 1) << op.offsets[f.name]
            assert not seen & mask, (op.name, f.name)
            seen |= mask
        assert op.used_bits <= isa.INSN_BITS


def test_out_of_range_field_rejected():
    op = BY_NAME["LOAD"]
    with pytest.raises(IsaError, match="out of range"):
        isa.encode(Instr("LOAD", {"len": op.fields[1].hi + 1}))
    with pytest.raises(IsaError, match="multiple of 16"):
        isa.encode(Instr("LOAD", {"addr": 8}))


@pytest.mark.parametrize("code", [0, 5, 63])
def test_decode_reserved_opcode_names_pc(code):
    blob = isa.encode_program([Instr("END")]) * 2 + code.to_bytes(isa.INSN_BYTES, "little")
    with pytest.raises(IsaError, match="pc 2: reserved opcode") as ei:
        isa.decode_program(blob)
    assert ei.value.pc == 2


def test_decode_reserved_enum_value():
    nop = BY_NAME["NOP"]
    with pytest.raises(IsaError, match="pc 4: NOP.queue has reserved value 3"):
        isa.decode(nop.code | (3 << nop.offsets["queue"]), pc=4)


def test_weight_formats_keep_their_codes():
    """uint4 took the last free code of the 2-bit fmt field; the older formats keep theirs (and program bytes)."""
    op = BY_NAME["GEMV"]
    assert isa.ENUMS["fmt"] == ("int4", "int8", "w16", "uint4")
    word = isa.encode(Instr("GEMV")) | (3 << op.offsets["fmt"])
    assert isa.weight_layout(isa.decode(word))[0] == "uint4"


def test_decode_reserved_high_bits():
    for op in OPCODES:
        word = isa.encode(Instr(op.name)) | (1 << (isa.INSN_BITS - 1))
        if op.used_bits < isa.INSN_BITS:
            with pytest.raises(IsaError, match="pc 7: .*reserved bits"):
                isa.decode(word, pc=7)
    with pytest.raises(IsaError, match="reserved bits"):
        isa.decode_program(isa.encode_program([Instr("END")]) + (31 | 1 << 10).to_bytes(isa.INSN_BYTES, "little"))


@pytest.mark.parametrize("name,dep", [("LOAD", "pop_prev"), ("LOAD", "push_prev"), ("STORE", "push_next"),
                                      ("STACC", "pop_next"), ("END", "pop_prev"), ("END", "push_next")])
def test_decode_illegal_deps_names_pc(name, dep):
    op = BY_NAME[name]
    word = op.code | 1 << (6 + DEP_FLAGS.index(dep))
    blob = isa.encode_program([Instr("END")]) * 3 + word.to_bytes(isa.INSN_BYTES, "little")
    with pytest.raises(IsaError, match=f"pc 3: .*{dep}") as ei:
        isa.decode_program(blob)
    assert ei.value.pc == 3
    with pytest.raises(IsaError, match=dep):
        isa.encode(Instr(name, {}, frozenset([dep])))


def test_nop_load_queue_deps():
    with pytest.raises(IsaError, match="pop_prev"):
        isa.assemble("NOP queue=load pop_prev")
    assert isa.assemble("NOP queue=load pop_next")[0].queue == "load"


def test_truncated_stream():
    with pytest.raises(IsaError, match="not a multiple of 16"):
        isa.decode_program(b"\x1f" * 17)


@pytest.mark.parametrize("text,line,msg", [
    ("END\nBOGUS x=1\n", 2, "unknown opcode"),
    ("# comment\n\nLOAD len=70000\n", 3, "out of range"),
    ("LOAD addr=0x10\nLOAD nosuch=1\n", 2, "no field 'nosuch'"),
    ("GEMV fmt=int3\n", 1, "expected one of"),
    ("END\nEND\nEND\nLOAD pop_prev\n", 4, "pop_prev"),
    ("LOAD len=abc\n", 1, "not an integer"),
    ("LOAD len=1 len=2\n", 1, "given twice"),
    ("LOAD wibble\n", 1, "neither"),
    ("LOAD addr=0x11\n", 1, "multiple of 16"),
    ("LOAD 3x\n", 1, "cannot parse"),
])
def test_assembler_errors_name_line(text, line, msg):
    with pytest.raises(IsaError) as ei:
        isa.assemble(text)
    assert ei.value.line == line
    assert str(ei.value).startswith(f"line {line}: ")
    assert msg in str(ei.value)


def test_assembler_syntax():
    prog = isa.assemble("load addr=0x20 len=4 dst=3 dst_e=E2 push_next  ; comment\nARGMAX x=3 len=4 rd=R5\nEND # done\n")
    assert [i.op for i in prog] == ["LOAD", "ARGMAX", "END"]
    assert prog[0].addr == 0x20 and prog[0].dst_e == 2 and prog[0].deps == {"push_next"}
    assert prog[1].rd == 5


def test_docs_page_is_current():
    page = ROOT / "docs" / "isa.md"
    assert page.read_text() == isa.render_markdown(), "docs/isa.md is stale: run `kvoverlay isa-doc`"
