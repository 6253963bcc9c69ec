"""Build progress: one line per stage in logs, a live line (with a bar where the stage can count) on a terminal."""

import io
import time

import pytest

from kvoverlay import progress
from kvoverlay.progress import Stages


def test_logs_get_a_line_when_a_stage_starts_and_ends():
    out = io.StringIO()
    stages = Stages("RTL model (tiny)", file=out)
    assert not stages.live  # a StringIO is not a terminal
    with stages.stage("Verilog export"):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0] == "RTL model (tiny): Verilog export ..."
    assert lines[1].startswith("RTL model (tiny): Verilog export done in ") and lines[1].endswith(" s")


def test_a_failed_stage_does_not_say_done():
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="make failed"), Stages("build", file=out).stage("C++ compile"):
        raise RuntimeError("make failed")
    assert "done" not in out.getvalue()


def test_live_stage_draws_the_count_it_polls(monkeypatch):
    monkeypatch.setattr(progress, "POLL_S", 0.01)
    out = io.StringIO()
    seen = iter([None, (1, 3), (2, 3)])
    state = {"last": None}

    def count():
        state["last"] = next(seen, (3, 3))
        return state["last"]

    with Stages("RTL model (tiny)", file=out, live=True).stage("C++ compile", count=count):
        time.sleep(0.2)
    text = out.getvalue()
    assert "RTL model (tiny): C++ compile" in text
    assert "2/3" in text and "3/3" in text


CLASSES_MK = """\
# Verilated -*- Makefile -*-
VM_PARALLEL_BUILDS = 0
VM_CLASSES_FAST += \\
  Vtop \\
  Vtop___024root__0 \\

VM_SUPPORT_SLOW += \\
  Vtop__Syms__Slow \\

VM_GLOBAL_FAST += \\
  verilated \\
  verilated_timing \\

VM_GLOBAL_SLOW += \\

"""
TOP_MK = "VM_USER_CLASSES = \\\n\tverilator \\\n\n"


def test_verilated_build_counts_its_objects_and_the_link(tmp_path):
    from kvoverlay.sim.rtl import _compile_progress

    assert _compile_progress(tmp_path, "tb") is None  # Verilator has not written its makefiles yet
    (tmp_path / "Vtop_classes.mk").write_text(CLASSES_MK)
    (tmp_path / "Vtop.mk").write_text(TOP_MK)
    # verilated, verilated_timing, verilator, Vtop__ALL (one file without parallel builds), then the link
    assert _compile_progress(tmp_path, "tb") == (0, 5)
    for name in ("verilated.o", "verilator.o", "Vtop__ALL.o"):
        (tmp_path / name).write_bytes(b"")
    assert _compile_progress(tmp_path, "tb") == (3, 5)
    (tmp_path / "verilated_timing.o").write_bytes(b"")
    (tmp_path / "tb").write_bytes(b"")
    assert _compile_progress(tmp_path, "tb") == (5, 5)
    (tmp_path / "Vtop_classes.mk").write_text(CLASSES_MK.replace("BUILDS = 0", "BUILDS = 1"))
    assert _compile_progress(tmp_path, "tb") == (4, 7)  # the model's three classes compile one by one


def test_a_terminal_that_reports_no_size_still_shows_the_stage():
    """A fresh pseudo-terminal says 0 columns and 0 rows (as under ``script`` or some CI runners)."""
    import os
    import pty

    master, slave = pty.openpty()
    assert os.get_terminal_size(slave) == (0, 0)
    with os.fdopen(slave, "w") as term:
        stages = Stages("RTL model (tiny)", file=term)
        assert stages.live
        with stages.stage("verilate"):
            pass
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other side is closed and drained
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert b"RTL model (tiny): verilate [00:00]" in shown
