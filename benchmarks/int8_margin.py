"""Where a quantized compile's greedy tokens leave fp32 onnxruntime's: a near-tie, or an error of the overlay?

Usage: python benchmarks/int8_margin.py CONFIG [CONFIG ...] [--weights int8] [--tokens 12] [--max-seq 40]
                                       [--model MODEL.onnx] [--json OUT]

Greedy-decodes ``--tokens`` tokens after ``models.trained.ENGLISH_PROMPT`` (the trained SmolLM2-135M of
``kvoverlay.models.trained`` unless ``--model``) three ways, and at the first step where a config's tokens leave
fp32 onnxruntime's, compares the logits of the two tokens in question:

* ``fp32``: onnxruntime on the model as given;
* ``weights``: fp32 onnxruntime on the model with every GEMV weight and the token table replaced by their
  dequantized values from the compiled image (``int4_formats._dequantized_model``): the error of the weight
  format alone, with float arithmetic everywhere else;
* each CONFIG (a preset or a TOML file): the golden model on the compile of the model for it.

A config whose golden logits sit close to the ``weights`` run's (rms, cosine) and whose tokens are that run's
follows its weights faithfully: where it leaves fp32, the weight format moved a near-tie, not the overlay's
arithmetic. Prints one block per config; each golden decode of the 30-layer model takes minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from int4_formats import _dequantized_model
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.quantize import SEARCHED
from kvoverlay.host.reference import matching_prefix, ort_decode
from kvoverlay.host.session import Session
from kvoverlay.models.trained import ENGLISH_PROMPT, trained_model

from kvoverlay.config import load_config


def _gap(logits, a: int, b: int) -> float:
    return round(float(logits[a] - logits[b]), 4)


def _versus(got, want) -> dict:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return {"cosine": round(float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)), 6),
            "max_abs": round(float(np.max(np.abs(got - want))), 4),
            "rms": round(float(np.sqrt(np.mean((got - want) ** 2))), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--weights", default="int8")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--max-seq", type=int, default=40)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    model = args.model or trained_model()
    prompt = Tokenizer.from_file(str(model.parent / "tokenizer.json")).encode(ENGLISH_PROMPT).ids
    fp32, fp32_logits = ort_decode(str(model), prompt, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        deq = _dequantized_model(model, args.configs[0], Path(tmp) / "weights.onnx", tables=True, weights=args.weights,
                                 group_size=load_config(args.configs[0]).group_size, method=SEARCHED.get(args.weights, "mse"))
        wq, wq_logits = ort_decode(str(deq), prompt, args.tokens)
    print(f"fp32 onnxruntime {fp32}\n{args.weights} weights in fp32 onnxruntime {wq} "
          f"({matching_prefix(wq, fp32)}/{args.tokens} equal to fp32)", flush=True)
    refs = {"fp32": (fp32, fp32_logits), "weights": (wq, wq_logits)}
    results = {"prompt": prompt, "fp32": fp32, "weights": wq, "configs": {}}
    for config in args.configs:
        b, _ = compile_model(str(model), config, weights=args.weights, max_seq=args.max_seq)
        with Session(b) as s:
            res = s.generate(prompt, args.tokens).result()
        runs = {**refs, "golden": (res.tokens, res.logits)}
        same = {name: matching_prefix(res.tokens, tokens) for name, (tokens, _) in refs.items()}
        # logits compare while the feeds are equal: up to the first step whose tokens differ
        vs = [_versus(g, w) for g, w in zip(res.logits[:same["weights"] + 1], wq_logits[:same["weights"] + 1])]
        r = {"tokens": res.tokens, "equal_to": same, "logits_vs_weights": vs, "splits": {}}
        print(f"{config}: {res.tokens}; {same['fp32']}/{args.tokens} equal to fp32, {same['weights']}/{args.tokens} "
              f"to the {args.weights}-weights run; logits against that run while fed alike: worst cosine "
              f"{min(v['cosine'] for v in vs)}, worst rms {max(v['rms'] for v in vs)}")
        for ref, step in same.items():
            if step == args.tokens:
                continue
            # the first step the config leaves *ref*: every run fed as the config was up to it compares there
            a, o = refs[ref][0][step], res.tokens[step]
            alike = {n: lg[step] for n, (t, lg) in runs.items() if matching_prefix(t, res.tokens) >= step}
            split = {"step": step, "tokens": [a, o], "gaps": {n: _gap(lg, a, o) for n, lg in alike.items()},
                     "golden_rms": {n: _versus(alike["golden"], lg)["rms"] for n, lg in alike.items() if n != "golden"}}
            r["splits"][ref] = split
            print(f"  leaves {ref} at step {step}: logit({a}) - logit({o}): "
                  + ", ".join(f"{n} {g:+}" for n, g in split["gaps"].items())
                  + "; golden logits rms against " + ", ".join(f"{n} {v}" for n, v in split["golden_rms"].items()),
                  flush=True)
        results["configs"][config] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
