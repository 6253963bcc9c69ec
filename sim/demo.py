"""A decoder block written in assembly, and ``kvoverlay run`` of raw instruction streams.

The hand-written program (one pre-norm attention block with an MLP and an LM
head, on deterministic weights, the KV cache on chip) predates the compiler; it
stays as the golden model's regression against a float64 reference of the same
quantized weights (``tests/test_golden.py``). ``kvoverlay demo`` now compiles an
ONNX model (:mod:`kvoverlay.host.commands`).
"""

from __future__ import annotations

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import load_config

from .golden import GoldenModel

D, HEADS, KV_HEADS, HD, FF, VOCAB = 64, 4, 2, 16, 128, 64
GROUP = 8

PROGRAM = """\
# registers: R0 = token id, R1 = position; ARGMAX leaves the next token in R2
# KVAPPEND and ATTN run in the store queue: tokens hand q, k, v over and the attention output back
LDROW addr={emb:#x} row_reg=R0 cols={D} fmt=int8 lg_group=0 sexp={emb_sexp} dst=0 dst_e=E0
LDROW addr={cos:#x} row_reg=R1 cols={half} fmt=w16 lg_group=0 sexp={cos_sexp} dst=1024 dst_e=E10
LDROW addr={sin:#x} row_reg=R1 cols={half} fmt=w16 lg_group=0 sexp={sin_sexp} dst=1088 dst_e=E11
LOAD addr={g1:#x} len={D} dst=1152 dst_e=E12
LOAD addr={g2:#x} len={D} dst=1216 dst_e=E13 push_next
NORM x=0 x_e=E0 g=1152 g_e=E12 dst=64 dst_e=E1 len={D} eps_m=41943 eps_e=-32 kind=rms pop_prev
GEMV addr={wq:#x} rows={D} cols={D} fmt=int8 lg_group=0 sexp={wq_sexp} x=64 x_e=E1 acc=0 acc_e=E20
REQ acc=0 acc_e=E20 len={D} dst=128 dst_e=E2
GEMV addr={wk:#x} rows={kvd} cols={D} fmt=int8 lg_group=0 sexp={wk_sexp} x=64 x_e=E1 acc=64 acc_e=E21
REQ acc=64 acc_e=E21 len={kvd} dst=192 dst_e=E3
GEMV addr={wv:#x} rows={kvd} cols={D} fmt=int8 lg_group=0 sexp={wv_sexp} x=64 x_e=E1 acc=128 acc_e=E22
REQ acc=128 acc_e=E22 len={kvd} dst=256 dst_e=E4
ROPE x=128 x_e=E2 cos=1024 cos_e=E10 sin=1088 sin_e=E11 dst=128 dst_e=E2 heads={HEADS} head_dim={HD} mode=half
ROPE x=192 x_e=E3 cos=1024 cos_e=E10 sin=1088 sin_e=E11 dst=192 dst_e=E3 heads={KV_HEADS} head_dim={HD} mode=half
VSCALE a=128 a_e=E2 dst=128 dst_e=E2 len={D} imm_m={qs_m} imm_e={qs_e} push_next
KVAPPEND k=192 k_e=E3 v=256 v_e=E4 kv_base=0 heads={KV_HEADS} head_dim={HD} pos_reg=R1 pop_prev
ATTN q=128 q_e=E2 dst=320 dst_e=E5 kv_base=0 q_heads={HEADS} kv_heads={KV_HEADS} head_dim={HD} len_reg=R1 len_imm=1 stats=512 push_prev
GEMV addr={wo:#x} rows={D} cols={D} fmt=int8 lg_group=0 sexp={wo_sexp} x=320 x_e=E5 acc=0 acc_e=E20 pop_next
REQ acc=0 acc_e=E20 len={D} dst=384 dst_e=E6
VADD a=0 a_e=E0 b=384 b_e=E6 dst=0 dst_e=E0 len={D}
NORM x=0 x_e=E0 g=1216 g_e=E13 dst=64 dst_e=E1 len={D} eps_m=41943 eps_e=-32 kind=rms
GEMV addr={w1:#x} rows={FF} cols={D} fmt=int4 lg_group=0 sexp={w1_sexp} x=64 x_e=E1 acc=0 acc_e=E20
REQ acc=0 acc_e=E20 len={FF} dst=448 dst_e=E7
ACT x=448 x_e=E7 dst=448 dst_e=E7 len={FF} func=silu
GEMV addr={w2:#x} rows={D} cols={FF} fmt=int4 lg_group=0 sexp={w2_sexp} x=448 x_e=E7 acc=0 acc_e=E20
REQ acc=0 acc_e=E20 len={D} dst=384 dst_e=E6
VADD a=0 a_e=E0 b=384 b_e=E6 dst=0 dst_e=E0 len={D}
GEMV addr={lm:#x} rows={VOCAB} cols={D} fmt=w16 lg_group=0 sexp={lm_sexp} x=0 x_e=E0 acc=0 acc_e=E20
REQ acc=0 acc_e=E20 len={VOCAB} dst=640 dst_e=E8
ARGMAX x=640 len={VOCAB} rd=R2 push_next
STORE src=640 src_e=E8 len={VOCAB} addr={out:#x} pop_prev
STACC acc=512 len={stats_len} addr={stats_out:#x}
END
"""


def _align(n, a=64):
    return -(-n // a) * a


def build(cfg, seed=0):
    """Assemble the demo program and its memory image; returns (instrs, image, params)."""
    rng = np.random.default_rng(seed)
    image, params, sym = bytearray(), {}, {}

    def place(name, blob):
        sym[name] = len(image)
        image.extend(blob)
        image.extend(b"\0" * (_align(len(image)) - len(image)))

    def matrix(name, w, fmt):
        q, sm, sexp = nx.quantize_matrix(w, fmt, GROUP)
        params[name] = nx.dequantize_matrix(q, sm, sexp, GROUP)
        place(name, nx.pack_rows(q, sm, fmt, GROUP, cfg.port_bytes))
        sym[name + "_sexp"] = sexp

    def record(name, v):
        m, e = nx.from_float(v)
        params[name] = nx.to_float(m, e)
        place(name, nx.pack_vector_record(m, e))

    kvd = KV_HEADS * HD
    matrix("emb", rng.normal(0, 1.0, (VOCAB, D)), "int8")
    pos = np.arange(cfg.kv_capacity)[:, None]
    inv = 10000.0 ** (-np.arange(HD // 2) / (HD // 2))
    matrix("cos", np.cos(pos * inv), "w16")
    matrix("sin", np.sin(pos * inv), "w16")
    record("g1", 1.0 + 0.1 * rng.normal(size=D))
    record("g2", 1.0 + 0.1 * rng.normal(size=D))
    for name, shape, fmt in [("wq", (D, D), "int8"), ("wk", (kvd, D), "int8"), ("wv", (kvd, D), "int8"),
                             ("wo", (D, D), "int8"), ("w1", (FF, D), "int4"), ("w2", (D, FF), "int4"),
                             ("lm", (VOCAB, D), "w16")]:
        matrix(name, rng.normal(0, 1.0 / np.sqrt(shape[1]), shape), fmt)
    sym["out"] = len(image)
    image.extend(b"\0" * _align(nx.vector_record_size(VOCAB)))
    sym["stats_out"] = len(image)
    image.extend(b"\0" * _align(16 * HEADS))
    qs_m, qs_e = nx.from_float(np.array([1.0 / np.sqrt(HD)]))
    text = PROGRAM.format(D=D, HEADS=HEADS, KV_HEADS=KV_HEADS, HD=HD, FF=FF, VOCAB=VOCAB, half=HD // 2, kvd=kvd,
                          qs_m=int(qs_m[0]), qs_e=qs_e, stats_len=2 * HEADS, **sym)
    params["qscale"] = float(qs_m[0]) * 2.0 ** qs_e
    return isa.assemble(text), bytes(image), params, sym, text


def reference_step(params, state, token, pos):
    """float64 forward of the same block on the same (dequantized) weights."""
    def rms(x, g):
        return x / np.sqrt(np.mean(x * x) + 41943 * 2.0 ** -32) * g

    def rope(x, heads):
        x = x.reshape(heads, HD)
        a, b = x[:, : HD // 2], x[:, HD // 2:]
        c, s = params["cos"][pos], params["sin"][pos]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=1).reshape(-1)

    x = params["emb"][token]
    h = rms(x, params["g1"])
    q = rope(params["wq"] @ h, HEADS) * params["qscale"]
    k = rope(params["wk"] @ h, KV_HEADS)
    v = params["wv"] @ h
    state.setdefault("k", []).append(k.reshape(KV_HEADS, HD))
    state.setdefault("v", []).append(v.reshape(KV_HEADS, HD))
    K, V = np.stack(state["k"], 1), np.stack(state["v"], 1)
    out = []
    for hq in range(HEADS):
        kvh = hq // (HEADS // KV_HEADS)
        s = K[kvh] @ q.reshape(HEADS, HD)[hq]
        p = np.exp(s - s.max())
        out.append(p @ V[kvh] / p.sum())
    x = x + params["wo"] @ np.concatenate(out)
    h = rms(x, params["g2"])
    u = params["w1"] @ h
    x = x + params["w2"] @ (u / (1 + np.exp(-u)))
    return params["lm"] @ x


def run_main(args) -> int:
    """``kvoverlay run FILE.bin``: execute an assembled stream, print registers and counters."""
    import json

    cfg = load_config(args.config)
    program = isa.decode_program(args.program.read_bytes())
    image = args.image.read_bytes() if args.image else b""
    try:
        regs = [int(v, 0) for v in args.args.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--args {args.args!r}: expected comma-separated integers") from None
    if len(regs) > isa.NUM_REGS:
        raise ValueError(f"--args sets {len(regs)} registers; there are {isa.NUM_REGS}")
    if getattr(args, "backend", "isa") == "rtl":
        from kvoverlay.sim.rtl import RtlModel

        model = RtlModel(cfg, image)
    else:
        model = GoldenModel(cfg, image)
    counters = model.run(program, args=regs)
    result = {"registers": model.regs, **counters.to_dict()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"registers: {' '.join(f'R{i}={v}' for i, v in enumerate(model.regs))}")
        print(f"cycles: {counters.cycles}  instructions: {counters.instructions}  "
              f"bytes read: {counters.total_read}  busy: {counters.busy}")
    return 0
