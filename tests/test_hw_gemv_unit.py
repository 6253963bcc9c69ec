"""GemvUnit in the whole overlay, on the run path: a compiled program whose quantization groups are narrower than
the GEMV engine's window (one port word of weights) decodes on the Verilated ulx3s overlay exactly as on the golden
model. Before, such a GEMV faulted GROUP on the RTL while the compiler and the golden model accepted it.

One Verilator build of ``ulx3s`` (cached under .cache/rtl, shared with tests/test_hw_overlay.py) serves the ulx3s
cases, among them a program with the attention split (GEMVs whose rows end in half an engine window).
"""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("cocotb_tools")

from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.session import Session
from kvoverlay.models.demo import build_llama_onnx
from kvoverlay.sim.rtl import build_model

from kvoverlay import isa
from kvoverlay.config import PRESETS

PROMPT = [5, 17, 42]
NEW_TOKENS = 3


def _run_both(program):
    """*program* on the golden model and the Verilated overlay; asserts their tokens and logits equal, returns
    ``(rtl, gold)``."""
    gold = Session(program, "isa").generate(PROMPT, NEW_TOKENS)
    with Session(program, "rtl") as sess:
        rtl = sess.generate(PROMPT, NEW_TOKENS).result()
    assert rtl.tokens == gold.tokens
    assert len(rtl.logits) == len(gold.logits) == NEW_TOKENS
    for a, b in zip(rtl.logits, gold.logits, strict=True):
        assert np.array_equal(a, b)
    return rtl, gold


@pytest.mark.parametrize("weights,group", [("int4", 32), ("uint4", 32)])
def test_narrow_group_program_on_ulx3s(tmp_path, weights, group):
    cfg = PRESETS["ulx3s"]
    build_model(cfg)
    path = tmp_path / "demo.onnx"
    build_llama_onnx(path)
    program, _ = compile_model(str(path), cfg, weights=weights, group_size=group,
                               max_seq=len(PROMPT) + NEW_TOKENS + 1)
    layouts = [isa.weight_layout(i) for i in program.instructions if i.op == "GEMV"]
    narrow = [(fmt, g) for fmt, g in layouts if g < cfg.weights_per_cycle(fmt)]
    assert narrow and len(narrow) == len(layouts), layouts  # every projection: groups of half a window
    rtl, gold = _run_both(program)
    print(f"ulx3s {weights} g{group}: tokens {rtl.tokens}; cycles/step rtl {rtl.step_cycles}, "
          f"golden model {gold.step_cycles}")


def test_split_attention_program_on_ulx3s(tmp_path):
    """The demo decoder's attention split in two per layer (``compiler.split_attention``, as with REQ at two words
    per cycle) runs on the Verilated ulx3s overlay (REQ at one word: the same program) exactly as on the golden
    model: tokens, logits and cycles. Each part's O projection has 32 int4 columns, half a window of the 256-bit
    port's engine, in the row record's only word past its header: the engine took no window of it before (a
    partial last window, hw/gemv.py's ``late_window``), and the RTL's tokens were not the golden model's."""
    cfg = PRESETS["ulx3s"]
    build_model(cfg)
    path = tmp_path / "demo.onnx"
    build_llama_onnx(path)
    whole, program = (compile_model(str(path), c, weights="int4", group_size=32,
                                    max_seq=len(PROMPT) + NEW_TOKENS + 1)[0] for c in (cfg, cfg.replace(req_lanes=2)))
    program = dataclasses.replace(program, config=cfg)

    def attns(p):
        return [i for i in p.instructions if i.op == "ATTN"]
    assert len(attns(program)) == 2 * len(attns(whole))
    partial = [i for i in program.instructions if i.op == "GEMV"
               and i.fields["cols"] % cfg.weights_per_cycle(isa.weight_layout(i)[0])]
    assert partial
    rtl, gold = _run_both(program)
    assert rtl.step_cycles == gold.step_cycles
    print(f"ulx3s split attention ({len(partial)} GEMVs of a partial window): tokens {rtl.tokens}; cycles/step "
          f"{rtl.step_cycles}")


def test_packed_rows_program_on_wide_port(tmp_path):
    """The demo decoder in int4 on tiny with a 512-bit port: its rows of 64 weights (36 bytes) go packed in blocks
    of 8 (GEMV packed=1), and the Verilated overlay (the GEMV unit's second accumulator ports) decodes it exactly
    as the golden model, at the golden model's cycles within the cycle model's 1%."""
    cfg = PRESETS["tiny"].replace(name="tiny512", port_bits=512)
    build_model(cfg)
    path = tmp_path / "demo.onnx"
    build_llama_onnx(path)
    program, _ = compile_model(str(path), cfg, weights="int4", max_seq=len(PROMPT) + NEW_TOKENS + 1)
    packed = [i for i in program.instructions if i.op == "GEMV" and i.fields.get("packed")]
    assert packed
    rtl, gold = _run_both(program)
    print(f"tiny512 int4 ({len(packed)} packed GEMVs): cycles/step rtl {rtl.step_cycles}, golden model "
          f"{gold.step_cycles}")
    for r, g in zip(rtl.step_cycles, gold.step_cycles, strict=True):
        assert abs(r - g) <= 0.01 * r
