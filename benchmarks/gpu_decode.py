"""The gpu backend on a GPT-2-small-shaped program beside transformers' own ``generate()``, hybrid attention's cost
per step and a batched prefill, in one run (the device machine's budget allows one).

Usage: python benchmarks/gpu_decode.py SKELETON.onnx OUT.json [--quick | --hybrid-only | --overlay-cycles]

SKELETON is ``benchmarks/gpt2_skeleton.py export``'s weightless GPT-2 small; its weights are put back (seeded) and
the model is compiled here with the compiler (onnx and numpy only). Measured, for fp32 and fp16:

* decode: 128 new tokens after a 32-token prompt at batch 1 (``end_to_end``: the prompt fed token by token, as
  ``Session.generate`` does; ``decode_only``: 127 steps after a batched prefill), and transformers'
  ``generate(cache_implementation="static")`` on a random-init GPT2LMHeadModel of the same shape, same device;
* correctness: greedy tokens and per-step logits cosine of the fp32 and fp16 programs against CPU onnxruntime;
* hybrid attention: the offload device's partial attention and the log-sum-exp merge over 1k and 8k offloaded tokens
  for all 12 layers (what one decode step adds to the overlay's own work);
* prefill: one batched pass over a 512-token prompt.

``--overlay-cycles`` instead reports the overlay's own step cycles for the same program (the golden model's timing
model; it needs Amaranth, which the device machine lacks), the other side of the hybrid and prefill comparisons.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gpt2_skeleton import GPT2_SMALL, inflate

CONFIG = {"max_layers": 12, "max_kv_heads": 12, "max_head_dim": 64, "kv_capacity": 256}
PROMPT_LEN, NEW = 32, 128
REPEATS = 3


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(torch, fn, repeats=REPEATS, warmup=2):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(torch)
        t0 = time.perf_counter()
        fn()
        _sync(torch)
        best = min(best, time.perf_counter() - t0)
    return best


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ours(torch, program, prompt, dtype, device, path, quick, compile=False):
    from kvoverlay.host.gpu import GpuBackend
    from kvoverlay.host.reference import matching_prefix, ort_decode

    t0 = time.perf_counter()
    g = GpuBackend(program, device=device, dtype=dtype, compile=compile)
    build_s = time.perf_counter() - t0
    out = {"build_s": round(build_s, 2)}
    steps = g.run_steps(prompt, 15, 0)  # also captures the CUDA graph
    toks = [s[0] for s in steps[PROMPT_LEN - 1:]]
    logits = [s[1] for s in steps[PROMPT_LEN - 1:]]
    ref_tokens, _ = ort_decode(path, prompt, len(toks))
    _, forced = ort_decode(path, prompt, len(toks), forced=toks)
    out["onnxruntime"] = {"matching_prefix": matching_prefix(toks, ref_tokens),
                          "of": len(toks), "logits_cosine_min": round(min(map(_cosine, logits, forced)), 6)}
    if quick:
        return out
    e2e = _timed(torch, lambda: g.run_steps(prompt, NEW - 1, 0))
    out["end_to_end_tok_s"] = round(NEW / e2e, 1)
    g.prefill(prompt)
    dec = _timed(torch, lambda: g.run_steps([], NEW - 1, PROMPT_LEN))
    out["decode_only_tok_s"] = round((NEW - 1) / dec, 1)
    out["ms_per_step"] = round(1e3 * dec / (NEW - 1), 3)
    return out


def transformers_generate(torch, dtype, device):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL, activation_function="gelu_new")).to(device, getattr(torch, dtype)).eval()
    ids = torch.randint(3, GPT2_SMALL["vocab_size"], (1, PROMPT_LEN), device=device)
    kw = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, "pad_token_id": 0,
          "cache_implementation": "static", "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        dt = _timed(torch, lambda: model.generate(ids, **kw))
    return {"version": transformers.__version__, "tok_s": round(NEW / dt, 1)}


def hybrid_cost(torch, device, sizes=(1024, 8192), profile=False):
    """ms per decode step that the offload device adds (12 layers), per offloaded-token count; with *profile*, the
    torch ops of one 1k step by self CPU time (where the host's time per layer goes)."""
    from kvoverlay.host.offload import _KvStore

    layers, heads, d = GPT2_SMALL["n_layer"], GPT2_SMALL["n_head"], GPT2_SMALL["n_embd"] // GPT2_SMALL["n_head"]
    out = {}
    rng = np.random.default_rng(0)
    for n in sizes:
        store = _KvStore(device, n)
        for layer in range(layers):
            store.put(layer, 0, rng.standard_normal((n, heads, d)), rng.standard_normal((n, heads, d)))
        q = rng.standard_normal((heads, d))
        overlay_part = (rng.standard_normal((heads, d)), rng.standard_normal(heads), np.ones(heads))

        def step(store=store, q=q, overlay_part=overlay_part, n=n):
            for layer in range(layers):
                store.merge(layer, q, range(n), overlay_part)

        out[f"{n}_offloaded_ms_per_step"] = round(1e3 * _timed(torch, step), 3)
        if profile and n == sizes[0]:
            out["profile_1k"] = _profile(torch, step)
        del store
    return out


def _profile(torch, fn, top=10):
    """The *top* torch ops of one call of *fn* by self CPU time: [name, calls, self CPU µs, self device µs]."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(torch)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [[e.key, e.count, round(e.self_cpu_time_total, 1), round(getattr(e, "self_device_time_total", 0.0), 1)]
            for e in rows]


def prefill(torch, program, device, dtype, n=512):
    from kvoverlay.host.gpu import GpuBackend

    g = GpuBackend(program, device=device, dtype=dtype, cuda_graph=False)
    toks = [int(t) for t in np.random.default_rng(2).integers(3, GPT2_SMALL["vocab_size"], size=n)]
    return {"tokens": n, "ms": round(1e3 * _timed(torch, lambda: g.prefill(toks)), 2)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit(__doc__)
    skeleton, out_path, quick = argv[0], argv[1], "--quick" in argv
    if "--overlay-cycles" in argv:
        Path(out_path).write_text(json.dumps(overlay_cycles(skeleton), indent=1) + "\n")
        return 0
    import torch
    from kvoverlay.compiler.driver import compile_model

    from kvoverlay.config import load_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    cfg = load_config("u280").replace(**CONFIG)

    def emit(key, value):  # the file grows section by section, so a run cut short still reports what it measured
        res[key] = value
        Path(out_path).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({key: value}), flush=True)

    # hybrid attention first, in a fresh process, then again after each phase: the step cost rose from 5.4 to 9.5 ms
    # between a --hybrid-only run and a full one; measuring both in one process says which phase leaves it slower
    emit("hybrid_attention_fresh", {dev: hybrid_cost(torch, dev, profile=True) for dev in dict.fromkeys((device, "cpu"))})
    if "--hybrid-only" in argv:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "gpt2_small.onnx")
        t0 = time.perf_counter()
        inflate(skeleton, path)
        res["inflate_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        prog, _ = compile_model(path, cfg, weights="w16", max_seq=PROMPT_LEN + NEW)
        res["compile_s"] = round(time.perf_counter() - t0, 1)
        emit("instructions", len(prog.instructions))
        prompt = [int(t) for t in np.random.default_rng(1).integers(3, GPT2_SMALL["vocab_size"], size=PROMPT_LEN)]
        for dtype in ("float32",) if quick else ("float32", "float16"):
            emit(f"gpu_backend_{dtype}", ours(torch, prog, prompt, dtype, device, path, quick))
            emit(f"hybrid_after_gpu_backend_{dtype}", hybrid_cost(torch, device, sizes=(1024,)))
            if not quick:
                emit(f"transformers_{dtype}", transformers_generate(torch, dtype, device))
                emit(f"hybrid_after_transformers_{dtype}", hybrid_cost(torch, device, sizes=(1024,)))
        emit("hybrid_attention", {dev: hybrid_cost(torch, dev, profile=True) for dev in dict.fromkeys((device, "cpu"))})
        if not quick:
            prog512, _ = compile_model(path, cfg, weights="w16", max_seq=512)
            emit("prefill_512", {dt: prefill(torch, prog512, device, dt) for dt in ("float32", "float16")})
        if not quick and device == "cuda":
            for dtype in ("float32", "float16"):
                try:
                    got = ours(torch, prog, prompt, dtype, device, path, quick, compile=True)
                except Exception as exc:  # noqa: BLE001 (torch.compile can fail many ways: report it, measure the rest)
                    got = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                emit(f"gpu_backend_{dtype}_compiled", got)
    return 0



def overlay_cycles(skeleton: str) -> dict:
    """Cycles of one overlay decode step of the same program (the golden model's timing model, which needs the hw
    package's cycle formulas, so this runs where Amaranth is installed): per KV length, and a 512-token prefill."""
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.sim.golden import _Timing

    from kvoverlay.config import load_config

    cfg = load_config("u280").replace(**CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "gpt2_small.onnx")
        inflate(skeleton, path)
        prog, _ = compile_model(path, cfg, weights="w16", max_seq=PROMPT_LEN + NEW)

    def step(kv_len):
        timing = _Timing(cfg)
        for pc, ins in enumerate(prog.instructions):
            timing.issue(pc, ins, kv_len if ins.op == "ATTN" else 0)
        return timing.finish()

    lens = {n: step(n) for n in (1, 128, 256)}
    # ATTN's cycles grow linearly in the KV length: the prefill sums the steps at lengths 1..512
    slope = (lens[256] - lens[128]) / 128
    prefill = sum(lens[1] + slope * (n - 1) for n in range(1, 513))
    return {"config": cfg.to_dict(), "clock_mhz": cfg.clock_mhz, "step_cycles_by_kv_len": lens,
            "step_us_at_256": round(lens[256] / cfg.clock_mhz, 2), "prefill_512_ms": round(prefill / cfg.clock_mhz / 1e3, 2),
            "weight_bytes": prog.manifest["weight_bytes"]}


if __name__ == "__main__":
    raise SystemExit(main())
