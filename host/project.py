"""``kvoverlay bench project``: tokens/s at batch 1 for full-size models, projected from the validated cycle model.

No RTL and no weights: the decode step's instruction stream is built from the model's shapes the way the compiler
lowers a Llama-style decoder (:func:`decode_instructions`; a test holds it to the compiler's own program, cycle for
cycle, on the shapes ``bench decode`` compiles), and its cycles come from the golden model's queue replay of the
units' formulas (:func:`kvoverlay.sim.golden.replay_cycles`, :mod:`kvoverlay.timing`), which the bench set holds
to the RTL within 1%. With ``--devices N`` the layers are split tensor-parallel (heads and FFN rows across the
cards, two all-reduces of the int64 accumulators per layer) and the inter-card link's time is added to each step.

What is a projection here and not the built overlay: a model whose KV the config's buffer cannot hold reads its KV
from external memory, modelled as streaming at the port's rate under the attention engine (the overlay as built
sends such KV to the offload device instead); a vocabulary beyond the accumulator buffer is tiled, one GEMV, REQ
and ARGMAX per tile (the compiler tiles such a head into halves of the accumulator buffer, with a store-queue
ARGMAXACC beside each next GEMV, which this projection does not model). Both are said in the result.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass

from kvoverlay import isa, timing
from kvoverlay import numerics as nx
from kvoverlay.config import WEIGHT_FORMATS, load_config
from kvoverlay.roofline import Roofline, bandwidth_efficiency, gemv_words, roofline_cycles

__all__ = ["FLIGHTLLM_TOKENS_PER_S", "MODELS", "ModelShape", "decode_instructions", "project", "project_main"]


@dataclass(frozen=True)
class ModelShape:
    """A decoder's shapes: what the projection needs of a model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    family: str = "llama"  # llama: RMSNorm, RoPE, SwiGLU; gpt2: LayerNorm, learned positions, GELU, biases

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    positions: int = 0  # learned position rows (gpt2)
    tied: bool = False  # the LM head is the embedding table (counted once)

    def parameters(self) -> int:
        """Parameters of the model (every matrix, table, norm and bias), as its model card counts them."""
        H, F = self.hidden, self.ffn
        attn = H * (2 * H + 2 * self.kv_heads * self.head_dim)
        if self.family == "llama":  # SwiGLU, RMSNorm gains, untied LM head
            return self.layers * (attn + 3 * H * F + 2 * H) + H + (1 if self.tied else 2) * self.vocab * H
        # GELU MLP, LayerNorm gains and biases, biases on every projection, learned positions, tied LM head
        per_layer = attn + 2 * H * F + 4 * H + (H + 2 * self.kv_heads * self.head_dim) + H + F + H
        return self.layers * per_layer + 2 * H + (self.vocab + self.positions) * H


#: The models' published shapes (their config.json).
MODELS = {
    "llama2-7b": ModelShape(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000),
    "llama3-8b": ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    # the issue's trained 135M Llama-family model: rows of 576 int8 weights + scales, 612 bytes, in u280's 1024-byte beat
    "smollm-135m": ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152, tied=True),
    "gpt2-xl": ModelShape(hidden=1600, layers=48, heads=25, kv_heads=25, ffn=6400, vocab=50257, family="gpt2",
                          positions=1024),
}

#: Published decode throughput at batch 1 on one Alveo U280: FlightLLM (FPGA '24), LLaMA2-7B.
FLIGHTLLM_TOKENS_PER_S = {"llama2-7b": 55.0}

#: Rows per GEMV tile of a vocabulary larger than the accumulator buffer (a power of two the 16-bit field holds).
MAX_TILE_ROWS = 1 << 15


def _group(cols: int, want: int) -> int:
    from kvoverlay.compiler.quantize import group_for

    return group_for(cols, want)


class _Stream:
    """Instruction builder: weight matrices laid out one after another, as the compiler's memory image does."""

    def __init__(self, config, fmt):
        self.cfg, self.fmt, self.code, self.addr = config, fmt, [], 0
        self.lg = {}

    def _layout(self, cols, fmt):
        group = _group(cols, self.cfg.group_size)
        return {"fmt": isa.ENUMS["fmt"].index(fmt), "lg_group": int(math.log2(group // isa.GROUP_BASE))}, group

    def add(self, op, deps=(), **fields):
        self.code.append(isa.Instr(op, fields, frozenset(deps)))

    def matrix(self, rows, cols, fmt=None, packed=False):
        """Place a rows x cols matrix (as packed rows with *packed*); returns (address, layout fields)."""
        fmt = fmt or self.fmt
        layout, group = self._layout(cols, fmt)
        addr = self.addr
        self.addr += nx.matrix_bytes(rows, cols, fmt, group, self.cfg.port_bytes, packed)
        return addr, layout

    def gemv(self, rows, cols, deps=()):
        """GEMV tiles of at most the accumulator buffer's rows, each followed by its REQ; rows narrower than a beat
        packed where the compiler packs them (timing.gemv_packs_rows)."""
        group = _group(cols, self.cfg.group_size)
        packed = timing.gemv_packs_rows(self.cfg, rows, cols, self.fmt, group)
        addr, layout = self.matrix(rows, cols, packed=packed)
        tile = min(self.cfg.acc_buffer_words, MAX_TILE_ROWS)  # a power of two: a multiple of a block of packed rows
        extra = {"packed": 1} if packed else {}
        for r0 in range(0, rows, tile):
            n = min(tile, rows - r0)
            offset = nx.matrix_bytes(r0, cols, self.fmt, group, self.cfg.port_bytes, packed)
            self.add("GEMV", deps, addr=addr + offset, rows=n, cols=cols, **layout, **extra, accumulate=0)
            self.add("REQ", len=n, fold=1)  # its GEMV's peak record (the compiler's fold_peaks)

    def ldrow(self, cols, fmt, row_reg, deps=()):
        addr, layout = self.matrix(1, cols, fmt)
        self.add("LDROW", deps, addr=addr, row_reg=row_reg, row_imm=0, cols=cols, **layout)

    def load(self, length, deps=()):
        addr = self.addr
        self.addr += -(-nx.vector_record_size(length) // self.cfg.port_bytes) * self.cfg.port_bytes
        self.add("LOAD", deps, addr=addr, len=length)


def decode_instructions(shape: ModelShape, config, fmt: str, devices: int = 1) -> list:
    """One decode step of *shape* on one of *devices* cards, as the compiler lowers it (timing fields only).

    Tensor-parallel: each card holds ``ceil(heads / devices)`` query heads and as many KV heads' share, and
    ``ceil(ffn / devices)`` FFN rows (the widest shard sets the step); norms and residual adds run on every card.
    The dependency tokens are the ones the compiler's codegen places for these programs.
    """
    s = _Stream(config, fmt)
    ffn_shard = math.ceil(shape.ffn / devices)
    dims = {"H": shape.hidden, "hd": shape.head_dim, "qh": math.ceil(shape.heads / devices),
            "kvh": math.ceil(shape.kv_heads / devices), "F": math.ceil(ffn_shard / isa.GROUP_BASE) * isa.GROUP_BASE}
    s.ldrow(shape.hidden, fmt if WEIGHT_FORMATS[fmt] >= 8 else "int8", 0)  # the token's embedding row
    (_llama_layers if shape.family == "llama" else _gpt2_layers)(s, shape, **dims)
    vocab = -(-shape.vocab // devices)
    s.gemv(vocab, shape.hidden)
    s.add("ARGMAX", ("push_next",), len=min(vocab, config.acc_buffer_words, MAX_TILE_ROWS))
    s.add("STORE", ("pop_prev",), addr=s.addr, len=min(vocab, config.act_buffer_words))
    s.add("END")
    return s.code


_PUSH, _POP, _BOTH = ("push_next",), ("pop_prev",), ("pop_next", "push_next")


def _parts(s, H, hd, qh, kvh):
    """Parts of a layer's attention, as compiler.split_attention splits it."""
    from kvoverlay.compiler.split_attention import parts_for

    return parts_for(s.cfg, s.fmt, H, qh, kvh, hd)


def _split_attention(s, H, hd, qh, kvh, first):
    """A layer's attention in parts, in the store queue beside the GEMVs, as compiler.split_attention orders it
    (part p's q/k/v GEMVs under part p - 1's attention, part p - 1's O product under part p's) with the tokens the
    compiler's insert_tokens places for it: q, k and v reach each KVAPPEND and ATTN from the compute queue (part p's
    k from its RoPE), and the compute queue's REQs that overwrite what part p - 1's KVAPPEND and ATTN read, and the
    O products, wait for them (in the first layer the buffers' allocation makes part 1's KVAPPEND and the last O
    product exchange one token more). The parts' O products are summed by VADDs."""
    n = _parts(s, H, hd, qh, kvh)
    hq, hk = qh // n, kvh // n

    def o_gemv(deps=()):
        addr, layout = s.matrix(H, hq * hd)
        s.add("GEMV", deps, addr=addr, rows=H, cols=hq * hd, **layout, accumulate=0)

    for p in range(n):
        shapes = [(hq * hd, H), (hk * hd, H), (hk * hd, H)]
        for rows, cols in shapes:
            addr, layout = s.matrix(rows, cols)
            s.add("GEMV", addr=addr, rows=rows, cols=cols, **layout, accumulate=0)
        for k, (rows, _) in enumerate(reversed(shapes)):  # the last GEMV's REQ first: it takes that GEMV's peak
            s.add("REQ", ("pop_next",) if p and k != 1 else (), len=rows, fold=int(k == 0))
        s.add("ROPE", _POP if first and p == 0 else (), heads=hq, head_dim=hd)
        s.add("ROPE", _PUSH if p else (), heads=hk, head_dim=hd)
        s.add("VSCALE", _PUSH, len=hq * hd)
        s.add("KVAPPEND", ("pop_prev", "push_prev") if first or not p else _POP, heads=hk, head_dim=hd)
        s.add("ATTN", ("pop_prev", "push_prev") if p else ("push_prev",), q_heads=hq, kv_heads=hk, head_dim=hd,
              stats=isa.ATTN_NO_STATS)
        if p >= 2:
            s.add("REQ", len=H, fold=0)  # part p - 2's O product, after part p's GEMVs
        if p >= 1:
            o_gemv()
    s.add("REQ", ("pop_next",), len=H, fold=1)
    o_gemv(("pop_next",) if first else ())
    s.add("REQ", len=H, fold=1)
    for _ in range(n - 1):
        s.add("VADD", len=H)


def _llama_layers(s, shape, H, hd, qh, kvh, F):
    """RMSNorm, q/k/v with RoPE (tables loaded once), GQA attention split by KV group, SwiGLU; ends with the final
    norm."""
    rms, silu = isa.ENUMS["norm"].index("rms"), isa.ENUMS["func"].index("silu")
    for layer in range(shape.layers):
        first = layer == 0
        s.load(H, _PUSH if first else _BOTH)  # the norm's gain
        s.add("NORM", _POP, len=H, kind=rms)
        split = _parts(s, H, hd, qh, kvh) > 1
        if split:
            if first:  # the rotary tables' rows of this position, shared by every layer
                s.code[-1] = isa.Instr("NORM", s.code[-1].fields, frozenset(("pop_prev", "push_prev")))
                s.ldrow(hd // 2, "w16", 1, ("pop_next",))
                s.ldrow(hd // 2, "w16", 1, _PUSH)
            _split_attention(s, H, hd, qh, kvh, first)
        else:
            s.gemv(qh * hd, H)
            if first:
                s.ldrow(hd // 2, "w16", 1)
                s.ldrow(hd // 2, "w16", 1, _PUSH)
            s.add("ROPE", _POP if first else (), heads=qh, head_dim=hd)
            s.gemv(kvh * hd, H)
            s.add("ROPE", heads=kvh, head_dim=hd)
            s.gemv(kvh * hd, H)
            s.add("VSCALE", _PUSH, len=qh * hd)
            s.add("KVAPPEND", _POP, heads=kvh, head_dim=hd)
            s.add("ATTN", ("push_prev",), q_heads=qh, kv_heads=kvh, head_dim=hd, stats=isa.ATTN_NO_STATS)
            s.gemv(H, qh * hd, ("pop_next",))
        s.add("VADD", ("push_prev",), len=H)  # the residual (the next gain's LOAD may reuse the old gain's words)
        s.load(H, _BOTH)
        s.add("NORM", _POP, len=H, kind=rms)
        s.gemv(F, H)
        s.add("ACT", len=F, func=silu)
        s.gemv(F, H)
        s.add("VMUL", len=F)
        # the residual (a split layer's allocation lets the down projection's words stay until it)
        s.gemv(H, F, () if split else ("push_prev",))
        s.add("VADD", ("push_prev",) if split else (), len=H)
    s.load(H, _BOTH)
    s.add("NORM", _POP, len=H, kind=rms)


def _gpt2_layers(s, shape, H, hd, qh, kvh, F):
    """Learned positions, LayerNorm (gain, then bias), biased projections, tanh GELU; ends with the final norm.
    Each bias and LayerNorm bias is a vector record the load queue brings in beside the compute queue."""
    layer_norm, gelu = isa.ENUMS["norm"].index("layer"), isa.ENUMS["func"].index("gelu_tanh")
    both_ways = ("pop_prev", "push_prev")

    def norm(last_pushes=True):
        s.load(H, _BOTH)
        s.add("NORM", both_ways, len=H, kind=layer_norm)
        s.load(H, _BOTH)  # its bias
        s.add("VADD", both_ways if last_pushes else _POP, len=H)

    def biased(rows, cols, gemv_deps=(), add_deps=both_ways):
        s.gemv(rows, cols, gemv_deps)
        s.load(rows, _BOTH)
        s.add("VADD", add_deps, len=rows)

    def split_attention():
        """compiler.split_attention's order and the compiler's tokens for GPT-2's biased q/k/v and O (the bias
        records come in through the load queue after each part's REQs; the parts' O products summed before the O
        bias)."""
        n = _parts(s, H, hd, qh, kvh)
        hq, hk = qh // n, kvh // n
        for p in range(n):
            shapes = [(hq * hd, H), (hk * hd, H), (hk * hd, H)]
            for k, (rows, cols) in enumerate(shapes):
                addr, layout = s.matrix(rows, cols)
                s.add("GEMV", ("push_prev",) if p and k == 2 else (), addr=addr, rows=rows, cols=cols, **layout,
                      accumulate=0)
            for k, (rows, _) in enumerate(reversed(shapes)):
                s.add("REQ", ("pop_next",) if p and k == 0 else (), len=rows, fold=int(k == 0))
            for k, (rows, _) in enumerate(shapes):
                s.load(rows, _BOTH)
                s.add("VADD", _POP if k == 2 else both_ways, len=rows)
            s.add("VSCALE", _PUSH, len=hq * hd)
            s.add("KVAPPEND", _POP, heads=hk, head_dim=hd)
            s.add("ATTN", ("push_prev",), q_heads=hq, kv_heads=hk, head_dim=hd, stats=isa.ATTN_NO_STATS)
        for p in range(n):
            addr, layout = s.matrix(H, hq * hd)
            s.add("GEMV", addr=addr, rows=H, cols=hq * hd, **layout, accumulate=0)
            s.add("REQ", ("pop_next",) if p == 0 else (), len=H, fold=1)
        for k in range(n - 1):
            s.add("VADD", ("push_prev",) if k == n - 2 else (), len=H)
        s.load(H, _BOTH)  # the O projection's bias
        s.add("VADD", _POP, len=H)
        s.add("VADD", ("push_prev",), len=H)  # the residual

    s.ldrow(H, "w16", 1, _PUSH)  # the position's learned embedding
    s.add("VADD", both_ways, len=H)
    for layer in range(shape.layers):
        norm()
        if _parts(s, H, hd, qh, kvh) > 1:
            split_attention()
            norm(last_pushes=False)
            biased(F, H, ("push_prev",), _POP)
            s.add("ACT", len=F, func=gelu)
            biased(H, F, ("push_prev",), _POP)
            s.add("VADD", ("push_prev",), len=H)
            continue
        biased(qh * hd, H)
        biased(kvh * hd, H)
        biased(kvh * hd, H, add_deps=_POP)
        s.add("VSCALE", len=qh * hd)
        s.add("KVAPPEND", heads=kvh, head_dim=hd)
        s.add("ATTN", q_heads=qh, kv_heads=kvh, head_dim=hd, stats=isa.ATTN_NO_STATS)
        # the first layer's output bias frees the records' words already (the embedding sum is dead by then)
        biased(H, qh * hd, ("push_prev",), both_ways if layer == 0 else _POP)
        s.add("VADD", () if layer == 0 else ("push_prev",), len=H)  # the residual
        norm(last_pushes=False)
        biased(F, H, ("push_prev",), _POP)
        s.add("ACT", len=F, func=gelu)
        biased(H, F, ("push_prev",), _POP)
        s.add("VADD", ("push_prev",), len=H)
    norm(last_pushes=False)


def _kv_offchip_bytes(shape, config, context, devices) -> int:
    """KV bytes a step reads from external memory per card. The KV pool holds the layers whose columns fit, packed
    as the compiler's layout packs them (``codegen.kv_layout``), their first ``kv_capacity`` tokens each; the other
    layers' KV, and the tokens beyond the capacity, are read from memory."""
    kvh = -(-shape.kv_heads // devices)
    per_layer = kvh * config.kv_head_columns(shape.head_dim)
    held = min(shape.layers, config.kv_columns // per_layer) if config.holds_kv(0, kvh, shape.head_dim) else 0
    record = 2 * kvh * nx.vector_record_size(shape.head_dim)
    return ((shape.layers - held) * context + held * max(0, context - config.kv_capacity)) * record


def project(model: str, config, weights: str = "int4", devices: int = 1, context: int = 128,
            link_gbps: float = 100.0, link_latency_us: float = 1.0) -> dict:
    """Projected decode figures of *model* on *devices* cards of *config* at batch 1, KV length *context*."""
    from kvoverlay.sim.golden import replay_cycles

    from .bench import cycle_breakdown

    if model not in MODELS:
        raise ValueError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
    if weights not in config.weight_formats:
        raise ValueError(f"--weights {weights}: config {config.name} is built with {', '.join(config.weight_formats)}")
    if devices < 1 or context < 1 or link_gbps <= 0 or link_latency_us < 0:
        raise ValueError(f"--devices {devices}, --context {context}, --link-gbps {link_gbps}, --link-latency-us "
                         f"{link_latency_us}: devices, context and link bandwidth must be positive")
    shape = MODELS[model]
    widest = max(shape.hidden, math.ceil(shape.ffn / devices))
    if widest > config.act_buffer_words:
        raise ValueError(f"{model}'s vectors of {widest} elements exceed config {config.name}'s activation buffer "
                         f"({config.act_buffer_words} elements); try --config u280 or more --devices")
    code = decode_instructions(shape, config, weights, devices)
    cycles, busy = replay_cycles(config, code, context)
    kv_bytes = _kv_offchip_bytes(shape, config, context, devices)
    attn = [ins for ins in code if ins.op == "ATTN"]
    attn_cycles = sum(timing.unit_cycles(config, ins, context) for ins in attn)
    kv_extra = max(0, math.ceil(kv_bytes / config.port_bytes) - attn_cycles)  # KV streaming the engine cannot hide
    compute_cycles = cycles + kv_extra
    hz = config.clock_mhz * 1e6
    # per layer two all-reduces of H int64 accumulators (ring: 2 (N-1) hops of 1/N of the vector), and a gather of
    # the N cards' argmax candidates
    link_s = 0.0
    if devices > 1:
        hop_bytes = 8 * shape.hidden / devices
        allreduce = 2 * (devices - 1) * (link_latency_us * 1e-6 + hop_bytes * 8 / (link_gbps * 1e9))
        link_s = shape.layers * 2 * allreduce + (devices - 1) * link_latency_us * 1e-6
    step_s = compute_cycles / hz + link_s
    regs = {0: 0, 1: context - 1}
    required = Roofline(config, code).required_bytes(regs, kv_bytes)
    roof = roofline_cycles(config, required)
    gemvs = [ins for ins in code if ins.op == "GEMV"]
    streamed = sum(gemv_words(config, ins) for ins in gemvs)
    packed = sum(gemv_words(config, ins, packed=True) for ins in gemvs)
    assumptions = []
    group_bits = min(_group(ins.fields["cols"], config.group_size) for ins in gemvs) * WEIGHT_FORMATS[weights]
    if group_bits < config.port_bits:
        assumptions.append(f"groups of {group_bits} bits, under one {config.port_bits}-bit port word: the GEMV engine "
                           f"scales up to {timing.gemv_narrow_scales(config)} groups per window in its adder tree at the "
                           "port rate; for this config that Verilog has not been converted yet (docs/boards.md)")
    if kv_bytes:
        assumptions.append("KV beyond the KV buffer streamed from memory under the attention engine (as built, it "
                           "goes to the offload device)")
    if any(ins.fields["rows"] > config.acc_buffer_words for ins in gemvs) or \
            math.ceil(shape.vocab / devices) > min(config.acc_buffer_words, MAX_TILE_ROWS):
        assumptions.append("the LM head tiled into GEMVs of at most 32768 rows, each with its REQ (the compiler's "
                           "tiles are halves of the accumulator buffer, its ARGMAXACC beside the next GEMV)")
    if devices > 1:
        assumptions.append("two ring all-reduces of the int64 accumulators per layer, not overlapped with compute")
    return {
        "assumptions": assumptions,
        "model": model, "shape": {**asdict(shape), "head_dim": shape.head_dim, "parameters": shape.parameters()},
        "config": config.name, "port_bytes": config.port_bytes, "clock_mhz": config.clock_mhz,
        "bandwidth_gbps_per_device": round(config.bandwidth_gbps, 1), "weights": weights, "backend": "projection",
        "devices": devices, "context": context, "link_gbps": link_gbps, "link_latency_us": link_latency_us,
        "kv_offchip": bool(kv_bytes), "kv_offchip_bytes_per_token": kv_bytes,
        "lm_head_tiles": math.ceil(-(-shape.vocab // devices) / min(config.acc_buffer_words, MAX_TILE_ROWS)),
        "macs_per_token": sum(ins.fields["rows"] * ins.fields["cols"] for ins in gemvs),
        "cycles_per_token": compute_cycles,
        "link_us_per_token": round(link_s * 1e6, 2),
        "bytes_required_per_token": required,
        "roofline_cycles_per_token": round(roof, 1),
        "bandwidth_efficiency": round(bandwidth_efficiency(roof, compute_cycles + link_s * hz), 4),
        "tokens_per_s": round(1 / step_s, 2),
        "bandwidth_limit_tokens_per_s": round(hz / roof, 2),
        "weight_streaming_cycles": streamed,
        "packed_weight_streaming_cycles": packed,
        "busy": busy,
        "breakdown": {**cycle_breakdown(config, code, context), "kv_streaming_not_hidden": kv_extra},
        "flightllm_tokens_per_s": FLIGHTLLM_TOKENS_PER_S.get(model) if config.name == "u280" and devices == 1 else None,
    }


def project_main(args) -> int:
    config = load_config(args.config)
    out = project(args.model, config, args.weights, args.devices, args.context, args.link_gbps, args.link_latency_us)
    if args.plot is not None:
        from .bench import plot_roofline

        plot_roofline([out], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"PROJECTION from the validated cycle model (no RTL run): {out['model']} ({out['shape']['parameters'] / 1e9:.2f}B "
          f"parameters), {out['weights']}, {out['devices']} x {out['config']} ({out['bandwidth_gbps_per_device']} GB/s, "
          f"{out['clock_mhz']:.0f} MHz), batch 1, KV length {out['context']}")
    print(f"  tokens/s                {out['tokens_per_s']:>12}   (bandwidth limit {out['bandwidth_limit_tokens_per_s']})")
    print(f"  cycles/token            {out['cycles_per_token']:>12}   (roofline {out['roofline_cycles_per_token']:.0f}, "
          f"efficiency {out['bandwidth_efficiency']:.1%})")
    print(f"  weight streaming        {out['weight_streaming_cycles']:>12}   (rows packed instead of padded to port beats: "
          f"{out['packed_weight_streaming_cycles']})")
    if out["devices"] > 1:
        print(f"  inter-card link         {out['link_us_per_token']:>12} us/token ({out['link_gbps']} Gb/s, "
              f"{out['link_latency_us']} us per hop)")
    if out["kv_offchip"]:
        print(f"  KV read from memory     {out['kv_offchip_bytes_per_token']:>12} bytes/token (modelled: the KV buffer "
              "does not hold it)")
    print("  where the cycles go     " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in out["breakdown"].items()))
    for line in out["assumptions"]:
        print(f"  assumed: {line}")
    if out["flightllm_tokens_per_s"]:
        print(f"  FlightLLM, published    {out['flightllm_tokens_per_s']:>12}   (LLaMA2-7B on one U280)")
    sys.stdout.flush()
    return 0
