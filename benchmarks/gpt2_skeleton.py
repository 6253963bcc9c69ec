"""A GPT-2-small-shaped ONNX export that travels without its weights.

``python benchmarks/gpt2_skeleton.py export OUT.onnx`` (needs the ``export`` extra) exports a random-init GPT-2
(n_embd 768, 12 layers, 12 heads, vocab 50257) with optimum-onnx and strips every float initializer of 4096 or more
elements down to its name, type and shape: the graph, the small constants, norms and biases stay. The result is a
few hundred kilobytes instead of 650 MB, so it fits the device machine's file transfer.

``inflate(skeleton, out)`` (onnx and numpy only) puts seeded N(0, 0.02²) weights back, the initialization GPT-2
itself uses; decode speed does not depend on the values, so the device compiles and times this model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": 3072, "vocab_size": 50257, "n_positions": 1024}
STRIP_AT = 4096
_MARK = "kvoverlay:stripped"


def export(out: str) -> None:
    import tempfile

    import onnx
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL, activation_function="gelu_new"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        main_export(str(Path(tmp) / "hf"), output=str(Path(tmp) / "onnx"), task="text-generation-with-past", opset=18,
                    device="cpu", dtype="fp32", no_post_process=True, do_validation=False, local_files_only=True)
        m = onnx.load(str(Path(tmp) / "onnx" / "model.onnx"))
    for init in m.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= STRIP_AT:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.doc_string = _MARK
    onnx.save(m, out)


def inflate(skeleton: str, out: str, seed: int = 0) -> None:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(skeleton)
    rng = np.random.default_rng(seed)
    for i, init in enumerate(m.graph.initializer):
        if init.doc_string == _MARK:
            w = (rng.standard_normal(tuple(init.dims), dtype=np.float32) * 0.02).astype(np.float32)
            t = numpy_helper.from_array(w, init.name)
            m.graph.initializer[i].CopyFrom(t)
    onnx.save(m, out)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "export":
        raise SystemExit(__doc__)
    export(sys.argv[2])
