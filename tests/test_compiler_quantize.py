"""Placement (compiler/quantize.py): rows narrower than a port beat are placed packed, and run bit-identically.

A packed matrix holds the same codes and scales as its padded row records, in blocks (numerics.packed_block), so a
program whose GEMVs stream packed rows must give exactly the logits of the same program with row records, in fewer
cycles; configs whose GEMV engine is not built for packed rows (tiny, ulx3s) place row records as before.
"""

import numpy as np
import pytest
from kvoverlay.compiler import quantize
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.session import Session
from kvoverlay.models.demo import build_llama_onnx

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS
from kvoverlay.timing import gemv_packs

PROMPT, NEW = [1, 5, 9], 3


@pytest.fixture(scope="module")
def model():
    return build_llama_onnx()


@pytest.mark.parametrize("port_bits,weights", [(1024, "int8"), (512, "int4"), (512, "uint4")])
def test_packed_rows_run_bit_identical(model, monkeypatch, port_bits, weights):
    """The demo decoder (rows of 64 and 128 weights) on tiny with a wide port: its narrow rows go packed, and the
    isa backend's tokens and logits equal those of the same compile with row records, in fewer cycles."""
    cfg = PRESETS["tiny"].replace(name=f"tiny{port_bits}", port_bits=port_bits)
    packed, _ = compile_model(model, cfg, weights=weights, max_seq=8)
    gemvs = [i for i in packed.instructions if i.op == "GEMV"]
    assert any(i.fields.get("packed") for i in gemvs)
    for ins in gemvs:  # packed exactly where rows are narrower than a beat and pack into fewer words
        fmt, group = isa.weight_layout(ins)
        narrow = nx.row_stride(ins.fields["cols"], fmt, group, 1) < cfg.port_bytes
        assert bool(ins.fields.get("packed")) <= narrow
    with monkeypatch.context() as mp:
        mp.setattr(quantize, "gemv_packs_rows", lambda *a: False)
        padded, _ = compile_model(model, cfg, weights=weights, max_seq=8)
    assert not any(i.fields.get("packed") for i in padded.instructions)
    assert len(packed.image) < len(padded.image)
    a = Session(packed, backend="isa").generate(PROMPT, NEW)
    b = Session(padded, backend="isa").generate(PROMPT, NEW)
    assert a.tokens == b.tokens
    assert all(np.array_equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    print(f"{cfg.name} {weights}: {sum(a.step_cycles)} cycles packed, {sum(b.step_cycles)} padded; image "
          f"{len(packed.image)} / {len(padded.image)} bytes")
    assert sum(a.step_cycles) < sum(b.step_cycles)


@pytest.mark.parametrize("name", ["tiny", "ulx3s"])
def test_small_ports_place_row_records(model, name):
    """Engines without packed rows (timing.gemv_packs) get row records, GEMV packed=0, as before."""
    assert not gemv_packs(PRESETS[name])
    b, _ = compile_model(model, name, weights="int8", max_seq=8)
    assert not any(i.fields.get("packed") for i in b.instructions if i.op == "GEMV")
