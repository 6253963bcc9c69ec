"""The pass list: every pass dumps under its own name, the dumps are what the compile made, and a compile
is deterministic (the same model twice gives the same bundle bytes)."""

import itertools
import subprocess
import sys

import onnx
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.fuse import fuse
from kvoverlay.compiler.passes import PIPELINE, Compilation, run_passes, run_pipeline
from kvoverlay.models.demo import build_llama_onnx

from kvoverlay import bundle as kvbundle
from kvoverlay import isa


@pytest.fixture(scope="module")
def model():
    return build_llama_onnx()


def _dump_names():
    return [f"{i:02d}_{p.name}{p.suffix}" for i, p in enumerate(PIPELINE)]


def test_pipeline_names_every_stage_once():
    names = [p.name for p in PIPELINE]
    assert names == ["frontend", "lower", "specialize_mask", "fold_constants", "dead_code", "partition", "fuse", "split_attention", "calibrate",
                     "quantize", "plan_memory", "emit", "fold_peaks", "insert_tokens", "bundle"]


def test_compile_dumps_every_pass(model, tmp_path):
    b, _ = compile_model(model, "tiny", weights="int4", dump_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == _dump_names()
    assert (tmp_path / "13_insert_tokens.s").read_text() == isa.disassemble(b.instructions)
    # the token pass adds token flags and relay NOPs, and nothing else
    untokened = [isa.Instr(i.op, i.fields, frozenset()) for i in b.instructions if i.op != "NOP"]
    assert (tmp_path / "12_fold_peaks.s").read_text() == isa.disassemble(untokened)
    # fold_peaks sets fold on every REQ that follows the GEMV of its range (a split layer's deferred REQs but the
    # first of each run do not), and nothing else
    unfolded = [isa.Instr(i.op, {**i.fields, "fold": 0} if i.op == "REQ" else i.fields) for i in untokened]
    follows = [bool(i.fields.get("fold")) for i in untokened if i.op == "REQ"]
    assert follows == [prev.op == "GEMV" and prev.fields["acc"] == i.fields["acc"]
                       for prev, i in itertools.pairwise(untokened) if i.op == "REQ"]
    assert sum(follows) > len(follows) // 2
    assert (tmp_path / "11_emit.s").read_text() == isa.disassemble(unfolded)
    assert "matrix w0:" in (tmp_path / "08_calibrate.txt").read_text()
    og = fuse(run_passes(model, kv_len=5), max_seq=b.manifest["max_seq"])
    assert (tmp_path / "06_fuse.txt").read_text() == og.dump()
    assert ":p1 = attn(" in (tmp_path / "07_split_attention.txt").read_text()


def test_cli_compile_dump_dir(model, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    res = subprocess.run([sys.executable, "-m", "kvoverlay.cli", "compile", str(path), "-o", str(tmp_path / "m.kvo"),
                          "--dump-dir", str(tmp_path / "dump")], check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == _dump_names()


@pytest.mark.parametrize(("weights", "method"), [("w16", "mse"), ("int8", "mse"), ("int4", "mse"), ("int4", "rtn")])
def test_compile_is_deterministic(model, weights, method):
    first, _ = compile_model(model, "tiny", weights=weights, method=method)
    again, _ = compile_model(model, "tiny", weights=weights, method=method)
    assert kvbundle.to_bytes(first) == kvbundle.to_bytes(again)


def test_run_pipeline_times_each_pass_and_stops_where_asked(model):
    c = run_pipeline(Compilation(model, kv_len=5), until="dead_code")
    assert list(c.seconds) == ["frontend", "lower", "specialize_mask", "fold_constants", "dead_code"]
    assert c.graph is not None and c.og is None
    with pytest.raises(ValueError, match="no such pass"):
        run_pipeline(Compilation(model), until="codegen")
