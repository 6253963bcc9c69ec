"""Accuracy and cycles of the compiled test models against fp32 onnxruntime, as a markdown table.

Usage: python benchmarks/accuracy.py

For each model (optimum-onnx exports of small random-init Llama/Qwen2/GPT-2, and the decoder built from ONNX's
Attention/RMSNormalization/RotaryEmbedding ops) and each weight format, greedy-decodes 16 tokens after the
prompt [5, 17, 42] on the golden model (config ``tiny``) and reports token agreement, the minimum per-step
logits cosine, and the golden model's cycles and bandwidth efficiency per decode token. For int4 it also
compares round-to-nearest and MSE-clipped scales over eight prompts, teacher-forced on onnxruntime's tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.commands import run_program
from kvoverlay.host.reference import ort_decode
from kvoverlay.host.session import Session
from kvoverlay.models.exported import build_onnx_ops_decoder, export_model

PROMPT, NEW = [5, 17, 42], 16


def int4_errors(model):
    rng = np.random.default_rng(5)
    prompts = [PROMPT] + [list(rng.integers(3, 250, size=3)) for _ in range(7)]
    progs = {m: compile_model(model, "tiny", weights="int4", max_seq=len(PROMPT) + NEW, method=m)[0] for m in ("rtn", "mse")}
    err = {m: [] for m in progs}
    for prompt in prompts:
        toks, ref = ort_decode(model, prompt, NEW)
        for m, b in progs.items():
            for g, r in zip(Session(b).teacher_forced(prompt, toks), ref, strict=True):
                err[m].append(np.sum((g - r) ** 2) / np.sum(r.astype(np.float64) ** 2))
    return {m: float(np.mean(v)) for m, v in err.items()}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        ops = Path(tmp) / "onnx_ops.onnx"
        build_onnx_ops_decoder(ops)
        models = {f: str(export_model(f)) for f in ("llama", "mistral", "qwen2", "gpt2")}
        models["onnx_ops"] = str(ops)
        print("| model | weights | prefix = ORT | min cosine | max abs err | cycles/token | bytes/token | bw efficiency |")
        print("|---|---|---|---|---|---|---|---|")
        int4 = {}
        for name, model in models.items():
            for w in ("w16", "int8", "int4"):
                b, _ = compile_model(model, "tiny", weights=w, max_seq=len(PROMPT) + NEW)
                out, _ = run_program(b, PROMPT, NEW, check=model)
                r = out["reference"]
                print(f"| {name} | {w} | {r['matching_prefix']}/{NEW} | {r['logits_cosine_min']:.5f} | "
                      f"{r['logits_max_abs_err']:.3g} | {out['cycles_per_token']:.0f} | {out['bytes_read_per_token']:.0f} | "
                      f"{out['bandwidth_efficiency']:.1%} |")
            int4[name] = int4_errors(model)
        print()
        print("| model | int4 rtn: relative squared logits error | int4 mse (calibrated clipping) |")
        print("|---|---|---|")
        for name, e in int4.items():
            print(f"| {name} | {e['rtn']:.4f} | {e['mse']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
