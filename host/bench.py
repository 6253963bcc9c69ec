"""``kvoverlay bench decode``: decode steps of a synthetic decoder, in cycles, against the memory roofline.

The decoder is the Llama-style builder of :mod:`kvoverlay.models.demo` at the asked shape, compiled as
``kvoverlay compile`` does. Its KV cache is filled to the context length the way the runtime's phase split fills
it after a GPU prefill (:func:`kvoverlay.host.offload.write_kv_program`: LOAD + KVAPPEND per layer and position),
so the bench simulates a few thousand cycles for the fill instead of ``--context`` decode steps; then it times
``--steps`` decode steps, the last of which attends over ``--context`` tokens. On ``--backend rtl`` both programs
sit in one simulator process (the KV buffer persists between them) and the golden model runs beside it, step
for step, for ``model_cycles_per_token`` and the bit-exactness check.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvoverlay import numerics as nx
from kvoverlay import timing
from kvoverlay.config import PRESETS, load_config
from kvoverlay.progress import Stages
from kvoverlay.roofline import Roofline, bandwidth_efficiency, gemv_words, roofline_cycles

from .backend import register_args

__all__ = ["BENCH_CONFIG", "DecodeShape", "bench_decode", "bench_decode_main", "cycle_breakdown"]

#: The default config of ``bench decode``: ``tiny`` (64-bit port, 4 vector lanes) with a KV buffer that holds the
#: default shape's 256-token context and external memory that holds its w16 weights. A config of its own, so the
#: RTL is a Verilator build of its own (once, cached like every other config's).
BENCH_CONFIG = PRESETS["tiny"].replace(name="tiny-kv256", kv_capacity=256, dram_bytes=1 << 25)

FORMATS = ("int8", "int4", "w16")


class DecodeShape:
    """The synthetic decoder: hidden width, layers, query and KV heads, FFN width and vocabulary."""

    def __init__(self, hidden=512, layers=4, heads=8, kv_heads=2, ffn=None, vocab=1024):
        for name, value in (("hidden", hidden), ("layers", layers), ("heads", heads), ("kv_heads", kv_heads),
                            ("vocab", vocab)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected a positive integer")
        if hidden % heads or (hidden // heads) % 2:
            raise ValueError(f"--hidden {hidden} must split into --heads {heads} heads of an even width")
        if heads % kv_heads:
            raise ValueError(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
        self.hidden, self.layers, self.heads, self.kv_heads, self.vocab = hidden, layers, heads, kv_heads, vocab
        self.ffn = 2 * hidden if ffn is None else ffn
        self.head_dim = hidden // heads

    def to_dict(self) -> dict:
        return {"hidden": self.hidden, "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "ffn": self.ffn, "vocab": self.vocab}

    def check_fits(self, config, context: int) -> None:
        """Refuse, in one line, a shape whose KV the config's buffer cannot hold at *context* tokens."""
        if not config.holds_kv(self.layers - 1, self.kv_heads, self.head_dim):
            raise ValueError(f"{self.layers} layers of {self.kv_heads} KV heads of {self.head_dim} do not fit config "
                             f"{config.name}'s KV buffer ({config.max_layers} layers, {config.max_kv_heads} heads of "
                             f"{config.max_head_dim}); bench decode times KV on chip")
        if not 1 <= context <= config.kv_capacity:
            raise ValueError(f"--context {context} must be in [1, {config.kv_capacity}], config {config.name}'s KV "
                             "capacity")


def compile_decoder(shape: DecodeShape, config, weights: str, context: int, seed: int = 0):
    """The synthetic decoder, built with onnx.helper and compiled for *config*: its bundle."""
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.models.demo import build_llama_onnx

    model = build_llama_onnx(vocab=shape.vocab, hidden=shape.hidden, layers=shape.layers, heads=shape.heads,
                             kv_heads=shape.kv_heads, head_dim=shape.head_dim, ffn=shape.ffn, seed=seed,
                             max_positions=max(context, 2))
    with tempfile.TemporaryDirectory() as tmp:  # the compiler maps the weights of a file
        path = Path(tmp) / "decoder.onnx"
        import onnx

        onnx.save(model, path)
        bundle, _ = compile_model(str(path), config, weights=weights, max_seq=context, method="rtn")
    return bundle


def kv_fill(program, shape: DecodeShape, positions: int, seed: int = 0):
    """The LOAD + KVAPPEND program writing *positions* tokens of random KV into every layer, and its image.

    Returns ``(instructions, image)``: the program's memory image with the KV records appended.
    """
    from .offload import write_kv_program

    rng = np.random.default_rng(seed)
    bases = [program.manifest["kv"]["layers"][str(layer)]["kv_base"] for layer in range(shape.layers)]
    entries = [(base, p, rng.normal(0, 1, (shape.kv_heads, shape.head_dim)),
                rng.normal(0, 1, (shape.kv_heads, shape.head_dim)))
               for base in bases for p in range(positions)]
    code, records = write_kv_program(program, entries, len(program.image))
    end = max([a + nx.vector_record_size(len(m)) for a, m, _ in records] or [len(program.image)])
    if end > program.config.dram_bytes:
        raise ValueError(f"weights and KV records need {end} bytes of external memory; config {program.config.name} "
                         f"has {program.config.dram_bytes}")
    image = bytearray(program.image) + bytearray(end - len(program.image))
    for addr, m, e in records:
        blob = nx.pack_vector_record(m, e)
        image[addr: addr + len(blob)] = blob
    return code, bytes(image)


def cycle_breakdown(config, instructions, kv_len: int) -> dict:
    """Where a step's compute-queue cycles go, by the units' cycle formulas (:mod:`kvoverlay.timing`).

    ``weight_streaming``: one cycle per weight word the GEMV engine streams (padding beats included);
    ``gemv_overhead``: each GEMV's pipeline and hand-shake cycles; ``vector``: the vector unit and REQ, the work
    that is exposed because it runs on the compute queue between GEMVs; ``dispatch``: the queue's dispatch cycle
    per instruction. The compute queue runs one instruction at a time, so these add up to its busy cycles.
    ``attention``: ATTN and KVAPPEND, which run in the store queue beside the compute queue; what of them the
    GEMVs do not hide shows as the compute queue's idle cycles (``outside_compute``, :func:`bench_decode`).
    """
    out = dict.fromkeys(("weight_streaming", "gemv_overhead", "vector", "attention", "dispatch"), 0)
    for ins in instructions:
        if ins.op in ("ATTN", "KVAPPEND"):
            out["attention"] += timing.unit_cycles(config, ins, kv_len)
            continue
        if ins.queue != "compute" or ins.op == "END":
            continue
        busy = timing.unit_cycles(config, ins, kv_len)
        out["dispatch"] += timing.DISPATCH_CYCLES
        if ins.op == "GEMV":
            words = gemv_words(config, ins)
            out["weight_streaming"] += words
            out["gemv_overhead"] += busy - words
        else:
            out["vector"] += busy
    return out


def _golden(program, image):
    from kvoverlay.sim.golden import GoldenModel

    return GoldenModel(program.config, image, regions=[tuple(r) for r in program.manifest.get("regions", [])])


def bench_decode(shape: DecodeShape, config, weights: str = "int8", context: int = 256, steps: int = 2,
                 backend: str = "isa", seed: int = 0) -> dict:
    """Time *steps* decode steps of *shape* on *backend*, the last attending over *context* tokens.

    Returns the figures ``kvoverlay bench decode --json`` prints (per token: the mean over the timed steps). Its
    stages (compile, golden model, simulator start, KV fill, steps) report on stderr as they go.
    """
    if backend not in ("rtl", "isa"):
        raise ValueError(f"--backend {backend!r}: expected rtl or isa")
    if weights not in config.weight_formats:
        raise ValueError(f"--weights {weights}: config {config.name} is built with {', '.join(config.weight_formats)}")
    if not 1 <= steps <= context:
        raise ValueError(f"--steps {steps} must be in [1, --context {context}]")
    shape.check_fits(config, context)
    first = context - steps  # the KV positions written before the timed steps
    stages = Stages(f"bench decode {weights} (hidden {shape.hidden}, layers {shape.layers}, KV {first} + {steps} steps)")
    t0 = time.perf_counter()
    with stages.stage("compile"):
        program = compile_decoder(shape, config, weights, context, seed)
    compile_s = time.perf_counter() - t0
    fill, image = kv_fill(program, shape, first, seed)
    regs = program.manifest["registers"]
    logits = program.manifest["logits"]

    with stages.stage(f"golden model: KV fill ({len(fill)} instructions) and {steps} steps"):
        gold = _golden(program, image)
        gold.run(fill, args=[0])
        token, model_steps = 1, []
        for k in range(steps):
            values = register_args(program, token, first + k)
            args = [values.get(i, v) for i, v in enumerate(gold.regs)]
            counters = gold.run(program.instructions, args=args)
            m, e = gold.read_vector_record(logits["addr"], logits["len"])
            model_steps.append((counters, m, e, dict(values)))
            token = gold.regs[regs["next_token"]]
    model_cycles = float(np.mean([c.cycles for c, *_ in model_steps]))

    out = {"shape": shape.to_dict(), "config": config.name, "weights": weights, "backend": backend,
           "context": context, "steps": steps, "port_bytes": config.port_bytes, "clock_mhz": config.clock_mhz}
    if backend == "isa":
        cycles = [c.cycles for c, *_ in model_steps]
        read = [c.total_read for c, *_ in model_steps]
        busy = model_steps[-1][0].busy
        stalls = None
    else:
        from kvoverlay.sim.rtl import RtlModel

        rtl = RtlModel(config, image)
        with stages.stage("RTL: simulator start (a first run of a config builds its model)"):
            proc = rtl.open(list(program.instructions) + list(fill))
        with proc:
            with stages.stage("RTL: KV fill"):
                fill_step = proc.run_steps(regs, logits, [0], 0, 0, entry=len(program.instructions))[0]
            with stages.stage(f"RTL: {steps} decode steps ({model_cycles:.0f} cycles each, predicted)"):
                hw_steps = proc.run_steps(regs, logits, [1], steps - 1, first)
        cycles = [s.hw_counters["cycles"] for s in hw_steps]
        read = [s.hw_counters["bytes_read"] for s in hw_steps]
        last = hw_steps[-1].hw_counters
        busy = {q: last[f"busy_{q}"] for q in ("load", "compute", "store")}
        stalls = {k: last[k] for k in last if k.startswith("stall_")}
        wall = sum(s.wall_s for s in hw_steps)
        out.update({
            "fill_cycles": fill_step.hw_counters["cycles"],
            "sim_cycles_per_s": round(sum(cycles) / wall) if wall > 0 else None,
            "bit_exact": all(len(h.logits_records) == 1 and np.array_equal(h.logits_records[0][0], m)
                             and h.logits_records[0][1] == e
                             for h, (_, m, e, _) in zip(hw_steps, model_steps, strict=True)),
        })
    cycles_per_token = float(np.mean(cycles))
    required = Roofline(config, program.instructions).required_bytes(model_steps[-1][3])
    roof = roofline_cycles(config, required)
    breakdown = cycle_breakdown(config, program.instructions, context)
    breakdown["outside_compute"] = cycles[-1] - busy["compute"]  # the compute queue idle: loads, tokens, drain
    if stalls is not None:
        breakdown.update(stalls)
    out.update({
        "cycles_per_token": round(cycles_per_token, 1),
        "bytes_read_per_token": round(float(np.mean(read)), 1),
        "bytes_required_per_token": required,
        "roofline_cycles_per_token": round(roof, 1),
        "bandwidth_efficiency": round(bandwidth_efficiency(roof, cycles_per_token), 4),
        "model_cycles_per_token": round(model_cycles, 1),
        "model_error": round((model_cycles - cycles_per_token) / cycles_per_token, 6),
        "breakdown": breakdown,
        "busy": busy,
        "weight_bytes": program.manifest["weight_bytes"],
        "macs_per_token": sum(i.fields["rows"] * i.fields["cols"] for i in program.instructions if i.op == "GEMV"),
        "tokens_per_s": round(config.clock_mhz * 1e6 / cycles_per_token, 1),
        "compile_s": round(compile_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    })
    return out


# ---------------------------------------------------------------- the roofline plot
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('--plot needs matplotlib: pip install "kvoverlay[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roofline(points: list, path) -> None:
    """Write a roofline PNG of *points* (``bench decode``/``bench project`` results) to *path*.

    x: operational intensity, 2 operations per weight (a multiply and an add) over the bytes a token must read;
    y: operations per cycle. Per config, the bandwidth ceiling (port bytes per cycle times the intensity) and per
    weight format the GEMV engine's compute ceiling (2 operations per weight it takes per cycle).
    """
    import io

    from kvoverlay.fileio import write_atomic

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [2 * p["macs_per_token"] / p["bytes_required_per_token"] for p in points]
    lo, hi = min(xs) / 4, max(xs) * 8
    grid = np.geomspace(lo, hi, 200)
    seen = set()
    for p in points:
        cfg = load_config(p["config"]) if p["config"] in PRESETS else None
        pb = p["port_bytes"]
        if ("bw", pb) not in seen:
            seen.add(("bw", pb))
            ax.plot(grid, pb * grid, "k-", lw=1, label=f"port bandwidth, {pb} B/cycle ({p['config']})")
        fmt = p["weights"]
        if ("mac", pb, fmt) not in seen:
            seen.add(("mac", pb, fmt))
            wpc = (cfg or PRESETS["tiny"].replace(port_bits=8 * pb)).weights_per_cycle(fmt)
            ax.axhline(2 * wpc, ls="--", lw=0.8, color="grey")
            ax.annotate(f"{fmt} compute ceiling ({wpc} weights/cycle)", (lo * 1.1, 2 * wpc * 1.08), fontsize=7)
    for p, x in zip(points, xs, strict=True):
        y = 2 * p["macs_per_token"] / p["cycles_per_token"]
        name = p.get("model") or f"hidden {p['shape']['hidden']}"
        label = f"{name} {p['weights']} ({p['backend']}): {p['bandwidth_efficiency']:.1%} of the roofline"
        ax.plot([x], [y], "o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("operational intensity (operations / byte a token must read)")
    ax.set_ylabel("operations / cycle")
    ax.set_title("decode, batch 1, against the memory-port roofline")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- the command
DECODE_LEGEND = """\
cycles/tok   cycles per decode token (mean over the timed steps): hardware counters on rtl, the golden
             model's timing model on isa
roofline     cycles the token's required bytes take at one port beat per cycle: weights at their format
             + group scales + table rows and records it loads (no padding, each byte once) / port bytes
bw eff       roofline / cycles/tok, the figure of merit (padding, re-reads and everything not hidden under
             weight streaming count against it)
model        the golden model's prediction of cycles/tok; model err = (model - cycles/tok) / cycles/tok
read/tok     bytes the port moved per token (padding beats included); required/tok: the roofline's bytes"""

BREAKDOWN_LEGEND = """\
weight streaming   one cycle per port word of weights the GEMV engine streams (the roofline's share and padding)
gemv overhead      each GEMV's pipeline fill and hand-shakes
vector             REQ, NORM, ROPE, ACT, VADD, VMUL, VSCALE, ARGMAX: exposed, as they run between GEMVs
attention          ATTN and KVAPPEND over the context, in the store queue beside the compute queue's GEMVs
dispatch           one cycle per compute instruction to start its unit
outside compute    cycles the compute queue sat idle (waiting on loads, tokens and the attention it did not hide,
                   end of step)
stall token Q      rtl only: cycles queue Q held an instruction waiting for a dependency token (the load and store
                   queues wait on compute most of the step; only compute's wait is exposed, within outside compute)
stall port Q       rtl only: cycles a unit of queue Q waited for the memory port (inside its busy cycles)"""


def _format_decode(results: list) -> str:
    r0 = results[0]
    s = r0["shape"]
    lines = [(f"bench decode: hidden {s['hidden']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads of "
             f"{s['head_dim']}, ffn {s['ffn']}, vocab {s['vocab']}; context {r0['context']} (last step), "
             f"{r0['steps']} steps; config {r0['config']} ({8 * r0['port_bytes']}-bit port)"),
             (f"{'weights':<8} {'backend':<7} {'cycles/tok':>11} {'roofline':>10} {'bw eff':>7} {'model':>11} "
             f"{'model err':>9} {'read/tok':>10} {'required/tok':>12}")]
    for r in results:
        lines.append(f"{r['weights']:<8} {r['backend']:<7} {r['cycles_per_token']:>11.0f} "
                     f"{r['roofline_cycles_per_token']:>10.0f} {r['bandwidth_efficiency']:>7.1%} "
                     f"{r['model_cycles_per_token']:>11.0f} {r['model_error']:>9.2%} {r['bytes_read_per_token']:>10.0f} "
                     f"{r['bytes_required_per_token']:>12}")
    lines += ["", DECODE_LEGEND, "", "where the cycles of the last step go:"]
    keys = list(dict.fromkeys(k for r in results for k in r["breakdown"]))
    lines.append(f"  {'':<22}" + "".join(f"{r['weights']:>11}" for r in results))
    for k in keys:
        row = [r["breakdown"].get(k) for r in results]
        cells = "".join(f"{v:>11}" if v is not None else f"{'-':>11}" for v in row)
        lines.append(f"  {k.replace('_', ' '):<22}{cells}")
    lines += ["", BREAKDOWN_LEGEND]
    for r in results:
        if "bit_exact" in r:
            lines.append(f"{r['weights']} rtl: logits bit-exact with the golden model: {r['bit_exact']}; "
                         f"{r['sim_cycles_per_s']} simulated cycles/s; KV written in {r['fill_cycles']} cycles")
    return "\n".join(lines)


def _formats(text: str) -> list:
    fmts = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ValueError(f"--weights {text!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    return fmts


def bench_decode_main(args) -> int:
    from kvoverlay.fileio import check_writable

    config = BENCH_CONFIG if args.config is None else load_config(args.config)
    shape = DecodeShape(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab)
    fmts = _formats(args.weights)
    shape.check_fits(config, args.context)
    if args.plot is not None:
        check_writable(args.plot)
        _pyplot()  # a missing matplotlib is reported before minutes of simulation

    results = [bench_decode(shape, config, fmt, args.context, args.steps, args.backend, args.seed) for fmt in fmts]
    if args.plot is not None:
        plot_roofline(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    else:
        print(_format_decode(results))
    return 0
