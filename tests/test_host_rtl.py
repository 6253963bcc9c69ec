"""Compiled models on the Verilated overlay (``--backend rtl``) against the golden model (``--backend isa``).

The same program and prompt must give bit-identical logits and the same tokens on both backends; the RTL runs
each generation in one simulator process (the KV buffer persists between steps, R2 is fed back inside the
simulator), and its cycles come from the hardware counters. One Verilator build of ``tiny`` (cached under
.cache/rtl) serves every case.
"""

import json

import numpy as np
import pytest

pytest.importorskip("cocotb_tools")

from conftest import FAMILIES
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.session import RtlBackend, Session, SessionError
from kvoverlay.models.demo import build_llama_onnx
from kvoverlay.sim.rtl import build_model
from test_cli import kvo

from kvoverlay import bundle as kvbundle
from kvoverlay.config import PRESETS

PROMPT = [5, 17, 42]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def rtl_model():
    return build_model(PRESETS["tiny"])


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.onnx"
    build_llama_onnx(path)
    return path


@pytest.fixture(scope="module")
def programs(demo_onnx):
    return {w: compile_model(str(demo_onnx), "tiny", weights=w, max_seq=len(PROMPT) + NEW_TOKENS + 2)[0]
            for w in ("w16", "int8", "int4")}


def assert_same_generation(program, prompt, new_tokens):
    gold = Session(program, "isa").generate(prompt, new_tokens)
    sess = Session(program, "rtl")
    rtl = sess.generate(prompt, new_tokens)
    assert rtl.tokens == gold.tokens
    assert len(rtl.logits) == len(gold.logits) == new_tokens
    for a, b in zip(rtl.logits, gold.logits):
        assert np.array_equal(a, b)
    # one step per position, each from the hardware counters of that run
    steps = sess.backend.steps
    assert [s.position for s in steps] == list(range(len(prompt) + new_tokens - 1))
    assert [s.token for s in steps] == prompt + rtl.tokens[:-1]
    assert rtl.step_cycles == [s.hw_counters["cycles"] for s in steps]
    assert all(c > 0 for c in rtl.step_cycles)
    assert rtl.step_bytes_read == [s.hw_counters["bytes_read"] for s in steps]
    return gold, rtl


@pytest.mark.parametrize("weights", ["w16", "int8", "int4"])
def test_demo_model_logits_bit_identical(rtl_model, programs, weights):
    gold, rtl = assert_same_generation(programs[weights], PROMPT, NEW_TOKENS)
    print(f"{weights}: tokens {rtl.tokens}; cycles/step rtl {rtl.step_cycles}, golden model {gold.step_cycles}; "
          f"bytes read/step rtl {rtl.step_bytes_read}, golden model {gold.step_bytes_read}")


def test_teacher_forced_and_single_steps(rtl_model, programs):
    """Teacher forcing with tokens the model would not choose, then single steps that continue the session."""
    program = programs["int4"]
    forced = [3, 60, 1, 33]
    gold, rtl = Session(program, "isa"), Session(program, "rtl")
    for a, b in zip(rtl.teacher_forced(PROMPT, forced), gold.teacher_forced(PROMPT, forced), strict=True):
        assert np.array_equal(a, b)
    for tok in (7, 9):  # the RTL backend replays its history in one process, so the KV state carries on
        ga, gb = gold.step(tok), rtl.step(tok)
        assert ga[0] == gb[0]
        assert np.array_equal(ga[1], gb[1])
    assert rtl.position == gold.position == len(PROMPT) + len(forced) - 1 + 2
    with pytest.raises(SessionError, match="outside the vocabulary"):
        Session(program, "rtl").generate([5, 1000], 2)
    assert isinstance(rtl.backend, RtlBackend)


def test_cli_run_rtl_dump_identical_to_isa(rtl_model, programs, tmp_path):
    prog = tmp_path / "demo.kvo"
    kvbundle.save(programs["int8"], prog)
    outs = {}
    for backend in ("isa", "rtl"):
        dump = tmp_path / f"{backend}.npz"
        res = kvo("run", prog, "--backend", backend, "--prompt", ",".join(map(str, PROMPT)), "--max-new-tokens", "4",
                  "--dump", dump, "--json")
        assert res.returncode == 0, res.stderr
        outs[backend] = json.loads(res.stdout)
        with np.load(dump) as z:
            outs[backend]["npz"] = (z["tokens"].copy(), z["logits"].copy())
    isa_out, rtl_out = outs["isa"], outs["rtl"]
    assert rtl_out["backend"] == "rtl"
    assert rtl_out["tokens"] == isa_out["tokens"]
    assert np.array_equal(rtl_out["npz"][0], isa_out["npz"][0])
    assert np.array_equal(rtl_out["npz"][1], isa_out["npz"][1])
    assert rtl_out["sim_cycles_per_s"] > 0 and "sim_cycles_per_s" not in isa_out
    assert rtl_out["cycles"] > 0 and rtl_out["cycles_per_token"] > 0
    print(f"cycles/token rtl {rtl_out['cycles_per_token']}, golden model {isa_out['cycles_per_token']}; "
          f"{rtl_out['sim_cycles_per_s']} simulated cycles/s")


@pytest.mark.parametrize("weights", ["w16", "int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_families_bit_identical(rtl_model, exported_models, family, weights):
    """Every exported family (GQA, MHA, MQA with biases and tied embeddings, GPT-2's LayerNorm/tanh GELU/learned
    positions, ONNX's Attention ops) in every weight format: the RTL decodes exactly what the golden model does."""
    program, _ = compile_model(str(exported_models[family]), "tiny", weights=weights, max_seq=8)
    assert_same_generation(program, [3, 11], 3)
