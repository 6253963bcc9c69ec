"""Handlers of ``kvoverlay compile``, ``kvoverlay run PROGRAM.kvo``, ``kvoverlay perplexity`` and ``kvoverlay demo``.

With ``--json`` a command prints exactly one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvoverlay import bundle as kvbundle
from kvoverlay.config import WEIGHT_CHOICES
from kvoverlay.fileio import check_writable, write_atomic

from .reference import matching_prefix
from .session import Session, SessionError, decode_stats
from .tokenizer import Tokenizer, find_tokenizer

__all__ = ["compile_main", "demo_main", "perplexity_main", "run_main"]

DEMO_PROMPT = (5, 17, 42)
DEFAULT_PROMPT = "5,17,42"
DEMO_NEW_TOKENS = 16


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def compile_main(args) -> int:
    from kvoverlay.compiler.driver import compile_model

    check_writable(args.output)
    tok_path = find_tokenizer(args.model, getattr(args, "tokenizer", None))
    # an unreadable tokenizer is refused before the compile, a mismatched one after it (parsed once)
    tok = None if tok_path is None else Tokenizer.from_file(tok_path, None)
    b, report = compile_model(str(args.model), args.config, weights=WEIGHT_CHOICES[args.weights], group_size=args.group_size,
                              max_seq=args.max_seq, kv_capacity=args.kv_capacity, method=args.quant,
                              dump_dir=args.dump_dir, host_ops=getattr(args, "offload_device", "auto") != "none",
                              logits=not getattr(args, "no_logits", False))
    if tok is not None:
        tok.check_vocab(b.manifest["logits"]["len"])
        b.tokenizer = tok.blob
        report["program_bytes"] = kvbundle.encoded_size(b)
    report["tokenizer"] = None if tok_path is None else str(tok_path)
    kvbundle.save(b, args.output)
    if args.json:
        print(json.dumps(report))
    else:
        _log(f"{args.output}: {report['instructions']} instructions, {report['program_bytes']} bytes "
             f"({report['weight_bytes']} of weights), KV capacity {report['kv_capacity_tokens']} tokens, "
             f"{'tokenizer ' + report['tokenizer'] if report['tokenizer'] else 'no tokenizer'}, "
             f"compiled in {report['compile_s']:.2f} s")
    return 0


def parse_prompt(text: str, what: str = "--prompt") -> list:
    try:
        toks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SessionError(f"{what} {text!r}: expected comma-separated token ids") from None
    if not toks and what == "--prompt":
        raise SessionError("--prompt is empty")
    return toks


def run_program(program, prompt, new_tokens, backend="isa", check=None, waves=None, *, sampling=None, stop=(),
                text=None, on_text=None, **options) -> tuple:
    """Run *program* on *backend*; with *check* (an ONNX model) compare against onnxruntime.

    *sampling* holds ``temperature``, ``top_k``, ``top_p`` and ``seed`` (greedy without it); *options* go to the
    backend. With *text* the prompt is that text through the program's tokenizer (*prompt* is ignored), and
    ``on_text(piece)`` receives the continuation as it decodes. Everything is checked (the prompt, the sampling
    parameters, the stop tokens, the backend's dependencies and the reference model) before the first step runs.
    """
    sampling = dict(sampling or {})
    with Session(program, backend=backend, waves=waves, **options) as session:
        if text is not None:
            prompt = session.encode(text)
        elif on_text is not None:
            session.tokenizer  # noqa: B018 - refuse a program without one before decoding
        gen = session.generate(prompt, new_tokens, stop=stop, **sampling)
        check_fits = getattr(session.backend, "check_fits", None)
        if check_fits is not None:  # refuse before the first step, not at the first position that overflows
            check_fits(session.position + len(prompt) + new_tokens - 2)
        reference = None
        if check is not None:
            from .reference import open_reference

            session._check_logits("--check")
            reference = open_reference(check, session.vocab)
        if on_text is not None:
            for piece in gen.text_stream():
                on_text(piece)
        res = gen.result()
        steps = [step_placement(session, st) for st in gen.steps]
        out = {"backend": session.backend_name, "tokens": res.tokens, "prompt_tokens": len(prompt),
               **decode_stats(session, res), "wall_s": round(res.wall_s, 3), "finish_reason": res.finish_reason,
               # the compile's op placement (host, overlay) and where the last step ran: its KV on chip and
               # offloaded, the layers and heads offloaded, the ops off the overlay, the device
               "placement": {**session.program.manifest.get("placement", {}), **(steps[-1] if steps else {})},
               "step_placement": steps}
        if sampling.get("temperature"):
            out["sampling"] = sampling
        if hasattr(session.backend, "sim_cycles_per_s"):
            out["sim_cycles_per_s"] = round(session.backend.sim_cycles_per_s)
        if text is not None or on_text is not None:
            out["text"] = session.decode(res.tokens)
    if reference is not None:
        from .reference import compare

        out["reference"] = compare(reference, prompt, res.tokens, res.logits)
    return out, res


def step_placement(session: Session, st) -> dict:
    """Where the step that chose generated token *st* ran: its backend's report, or all on the overlay."""
    from .offload import placement

    where = getattr(st.counters, "placement", None)
    return where or placement(session.program.manifest, st.position - 1, None, "overlay")


RAW_ONLY = ("config", "image", "args")


def run_main(args) -> int:
    blob = args.program.read_bytes()
    if not blob.startswith(kvbundle.MAGIC):
        from kvoverlay.sim.demo import run_main as run_raw

        if args.backend not in ("isa", "rtl"):
            raise SessionError(f"--backend {args.backend}: raw instruction streams run on isa or rtl")
        args.config = args.config or "tiny"
        args.args = args.args or ""
        return run_raw(args)
    given = [f"--{name}" for name in RAW_ONLY if getattr(args, name) is not None]
    if given:
        raise SessionError(f"{', '.join(given)}: for raw instruction streams only; {args.program} is a program "
                           "bundle, which carries its own configuration, memory image and registers")
    program = kvbundle.from_bytes(blob)
    if args.dump and "logits" in program.manifest and not kvbundle.logits_records(program.manifest["logits"]):
        raise SessionError(f"--dump writes logits, and {args.program} was compiled with --no-logits")
    text = getattr(args, "text", None)
    if text is not None and args.prompt is not None:
        raise SessionError("--text and --prompt: give one (text through the program's tokenizer, or token ids)")
    prompt = parse_prompt(DEFAULT_PROMPT if args.prompt is None else args.prompt)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    options = {"offload_device": args.offload_device, "kv_sinks": args.kv_sinks, "prefill": args.prefill}
    if args.backend == "board":
        options.update(port=args.port, **({"baud": args.baud} if args.baud else {}),
                       **({"memory": args.mem} if getattr(args, "mem", None) else {}))
    elif args.port or args.baud or getattr(args, "mem", None):
        raise SessionError(f"--port, --baud and --mem are for --backend board, not {args.backend}")
    # the continuation streams to stdout as it decodes; with --json it comes once, in the JSON object
    on_text = None if text is None or args.json else lambda piece: print(piece, end="", flush=True)
    out, res = run_program(program, prompt, args.max_new_tokens, args.backend,
                           str(args.check) if args.check else None, waves=args.waves, sampling=sampling,
                           stop=parse_prompt(args.stop, "--stop"), text=text, on_text=on_text, **options)
    if on_text is not None:
        print()
    if args.dump:
        buf = io.BytesIO()
        np.savez(buf, tokens=np.asarray(res.tokens, np.int64), logits=np.stack(res.logits).astype(np.float64))
        write_atomic(args.dump, buf.getvalue())
    if args.json:
        print(json.dumps(out))
    else:
        # with --text, stdout holds the continuation alone and the figures go to stderr
        report = _log if text is not None else print
        report(f"tokens: {','.join(map(str, res.tokens))}")
        if out["cycles_per_token"] is None:
            report(f"no cycle counters on --backend {out['backend']}; wall {out['wall_s']:.2f} s")
        else:
            report(f"cycles/token {out['cycles_per_token']:.0f}, roofline {out['roofline_cycles_per_token']:.0f}, "
                   f"bandwidth efficiency {out['bandwidth_efficiency']:.1%}, wall {out['wall_s']:.2f} s")
        if "reference" in out:
            r = out["reference"]
            report(f"onnxruntime: first {r['matching_prefix']}/{len(res.tokens)} tokens agree, min logits cosine "
                   f"{r['logits_cosine_min']:.6f}, max abs error {r['logits_max_abs_err']:.4g}")
    return 0


def perplexity_main(args) -> int:
    """``kvoverlay perplexity``: the tokens of the text file, scored on the backend (and by onnxruntime)."""
    from .perplexity import ort_perplexity, perplexity

    program = kvbundle.load(args.program)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise SessionError(f"--max-tokens {args.max_tokens} must be at least 2")
    if args.chunk is not None and args.chunk < 2:
        raise SessionError(f"--chunk {args.chunk} must be at least 2")
    text = args.text_file.read_text(encoding="utf-8")
    with Session(program) as session:  # the tokenizer and the reference are checked before any step
        ids = session.encode(text)[:args.max_tokens]
        vocab = session.vocab
    reference = None
    if args.check is not None:
        from .reference import open_reference

        reference = open_reference(str(args.check), vocab)
    out = {"backend": args.backend, **perplexity(program, ids, args.backend, chunk=args.chunk)}
    if reference is not None:
        ref = ort_perplexity(reference, ids, out["chunk"])
        out["reference"] = {"nll": ref["nll"], "perplexity": ref["perplexity"]}
        out["nll_rel_diff"] = out["nll"] / ref["nll"] - 1
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {out['perplexity']:.4f}, mean NLL {out['nll']:.5f} nats over {out['tokens']} tokens "
              f"(chunks of {out['chunk']}, --backend {args.backend})")
        if reference is not None:
            print(f"onnxruntime fp32: perplexity {out['reference']['perplexity']:.4f}, mean NLL "
                  f"{out['reference']['nll']:.5f}; NLL {out['nll_rel_diff']:+.2%} against it")
    return 0


DEMO_WEIGHTS = ("w16", "int8", "int4")
#: Smallest acceptable teacher-forced logits cosine per weight format (int4 is reported, not judged).
DEMO_MIN_COSINE = {"w16": 0.999, "int8": 0.99, "int4": 0.0}
DEMO_HEADER = f"{'weights':<8} {'tokens':<48} {'match':>6} {'cosine':>9} {'cycles/tok':>10} {'bw eff':>7}"
DEMO_LEGEND = """\
match       leading tokens that agree with onnxruntime's greedy decoding (fp32, same ONNX file),
            up to the first difference; rtl-int8: with the int8 row (same program, --backend isa)
cosine      smallest per-step cosine of the overlay's logits and onnxruntime's, onnxruntime fed
            the overlay's tokens (so one flipped token does not spoil the later steps);
            rtl-int8: whether its logits equal the int8 row's bit for bit
cycles/tok  cycles per decode token, from the golden model's timing model;
            rtl-int8: from the hardware counters
bw eff      bandwidth efficiency: the memory roofline (bytes a token must read / port bytes
            per cycle) divided by cycles/tok"""


def _demo_row(name, tokens, match, cosine, out) -> str:
    toks = ",".join(map(str, tokens))
    return (f"{name:<8} {toks[:48]:<48} {match:>6} {cosine:>9} {out['cycles_per_token']:>10.0f} "
            f"{out['bandwidth_efficiency']:>7.1%}")


def _demo_rtl_row(program, isa_out, isa_res) -> bool:
    """Run the int8 program on the Verilated overlay; print its row: tokens, match against isa, cycles per token."""
    _log("kvoverlay demo: int8 program on the RTL (--backend rtl: Verilated overlay, built once per config and cached)")
    out, res = run_program(program, list(DEMO_PROMPT), len(isa_res.tokens), backend="rtl")
    same_tokens = res.tokens == isa_res.tokens
    identical = same_tokens and all(np.array_equal(a, b) for a, b in zip(res.logits, isa_res.logits))
    match = f"{matching_prefix(res.tokens, isa_res.tokens)}/{len(res.tokens)}"
    print(_demo_row("rtl-int8", res.tokens, match, "bit-exact" if identical else "DIFFERS", out))
    _log(f"rtl: tokens and logits {'bit-identical to' if identical else 'DIFFER from'} --backend isa; cycles per token "
         f"{out['cycles_per_token']:.0f} from the hardware counters (golden model predicts {isa_out['cycles_per_token']:.0f}); "
         f"{out['sim_cycles_per_s']} simulated cycles/s")
    return identical


def _int4_note(ref: dict, n: int) -> str:
    """Why the int4 row parts from onnxruntime early, in the reference's own figures."""
    return (f"int4: {ref['matching_prefix']}/{n} tokens agree. The demo's weights are random, not trained: rounded to 16\n"
            f"      levels per group they move the logits by up to {ref['logits_max_abs_err']:.3g}, while onnxruntime's two "
            f"best logits lie\n      as little as {ref['top2_margin_min']:.3g} apart, so greedy choices flip. The cosine "
            f"({ref['logits_cosine_min']:.4f}) is what stays\n      comparable; docs/benchmarks.md has int4 on the "
            f"exported test models.")


def _keep(folder: Path, model: Path, programs: dict, new_tokens: int) -> None:
    """Copy the demo's ONNX file and write its programs into *folder*, for the README's other commands.

    The programs hold the prompt and *new_tokens* (their ``--max-seq``), which the hint passes on.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / model.name)
    for weights, program in programs.items():
        kvbundle.save(program, folder / f"demo-{weights}.kvo")
    _log(f"kept in {folder}: {model.name} and " + ", ".join(f"demo-{w}.kvo" for w in programs)
         + f"; try: kvoverlay run {folder / 'demo-int8.kvo'} --max-new-tokens {new_tokens} --check {folder / model.name}")


def demo_main(args) -> int:
    """Build the demo decoder (onnx.helper, deterministic weights), compile it per weight format, run, check."""
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.models.demo import build_llama_onnx

    config = getattr(args, "config", None) or "tiny"
    new_tokens = getattr(args, "tokens", None) or DEMO_NEW_TOKENS
    keep = getattr(args, "keep", None)
    if keep is not None and keep.exists() and not keep.is_dir():
        raise NotADirectoryError(f"--keep {keep}: not a directory")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "demo.onnx"
        build_llama_onnx(model, seed=getattr(args, "seed", 0) or 0)
        _log(f"kvoverlay demo: Llama-style decoder (2 layers, GQA 4/2 heads, SwiGLU, RoPE) built with onnx.helper; "
             f"prompt {list(DEMO_PROMPT)}, {new_tokens} new tokens, config {config}, golden model (--backend isa)")
        print(DEMO_HEADER)
        ok = True
        results = {}
        for weights in DEMO_WEIGHTS:
            b, _ = compile_model(str(model), config, weights=weights, max_seq=len(DEMO_PROMPT) + new_tokens)
            out, res = run_program(b, list(DEMO_PROMPT), new_tokens, check=str(model))
            results[weights] = (b, out, res)
            r = out["reference"]
            print(_demo_row(weights, res.tokens, f"{r['matching_prefix']}/{len(res.tokens)}",
                            f"{r['logits_cosine_min']:.5f}", out))
            ok &= r["logits_cosine_min"] >= DEMO_MIN_COSINE[weights]
            ok &= weights != "w16" or r["token_match"]
        if not getattr(args, "no_rtl", False):
            ok &= _demo_rtl_row(*results["int8"])
        print()
        print(DEMO_LEGEND)
        int4 = results["int4"][1]["reference"]
        if int4["matching_prefix"] < new_tokens:
            print(_int4_note(int4, new_tokens))
        if keep is not None:
            _keep(keep, model, {w: results[w][0] for w in DEMO_WEIGHTS}, new_tokens)
    _log(f"reference: onnxruntime fp32 on the same ONNX file; wall {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1
