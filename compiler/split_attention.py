"""``split_attention``: each layer's attention split by KV group, interleaved with the GEMVs that do not need it.

KVAPPEND and ATTN run in the store queue, beside the compute queue's weight stream (kvoverlay.isa), but within a
layer everything depends on the attention before or after it: q, k and v are its inputs, the O projection its
output. This pass makes the independence: a layer's attention of ``kv_heads`` KV heads becomes ``parts`` attentions
of ``kv_heads / parts`` KV heads each (with their query heads), each with its own Q, K and V rows (their GEMVs
split by rows, their RoPE and bias by heads) and its own slice of the O projection's columns (a GEMV of the
part's output; the parts' products summed by VADDs). In program order each part's q, k and v come after the
previous part's attention, and each part's O product after the next part's attention::

    QKV_0  attn_0  QKV_1  attn_1  O_0  QKV_2  attn_2  O_1 ...  O_(P-1)  sum

so the compute queue streams QKV_(p+1)'s and O_(p-1)'s weights while the attention engine works on part p.

The numerics change, not only the order: each part's q, k and v are requantized with an exponent of their own,
and each part's attention output and O product too (split-K over parts with different exponents cannot
accumulate in one GEMV). The KV layout does not change (part p's heads are the layer's heads from
``p * kv_heads / parts`` on, at their columns), so the host's KV fill and offload see the same layer.

A layer stays whole where the pattern is not this plain one (a q/k norm, a GEMV read by another op, a
pre-quantized matrix, a vector the host reads), for a layer off the KV pool (the host runs its attention), and
with one KV head. A hybrid program's host merges each part's ATTN with the offloaded KV of the part's heads, which
its KVAPPEND (at the part's ``kv_base``) handed over.
"""

from __future__ import annotations

from collections import defaultdict

from kvoverlay import numerics as nx
from kvoverlay import timing
from kvoverlay.config import OverlayConfig

from .codegen import kv_layout
from .fused.attention import Attention
from .fused.elementwise import Add, AddC
from .fused.linear import Linear, Requant
from .fused.rope import Rope
from .overlay_graph import OverlayGraph, VOp
from .quantize import group_for

__all__ = ["MAX_PARTS", "parts_for", "split_attention"]

#: The most parts a layer's attention is split into: each part costs a REQ and a VADD of the hidden vector more
#: (its O product) and an ATTN's output passes; two already put the attention of the bench's default shape under
#: the neighbouring weight streams as far as they reach.
MAX_PARTS = 2


def parts_for(cfg: OverlayConfig, fmt: str, hidden: int, q_heads: int, kv_heads: int, head_dim: int,
              parts: int | None = None) -> int:
    """Parts a layer's attention is split into: the most of at most *parts* (default :data:`MAX_PARTS`) that divide
    *kv_heads*, if the split hides more cycles than it adds by the timing formulas, else 1.

    Hidden: each part's attention over ``cfg.kv_capacity`` positions, up to the weight words streamed beside it (the
    next part's q/k/v GEMVs, the previous part's O product, in *fmt* with ``cfg.group_size`` groups). Added: per
    part but the first a REQ and a VADD of the hidden vector (its O product), and per part the peak passes of the
    REQs that no longer follow their GEMV (q and k). So a wide port, where the weights stream fast and a REQ of the
    hidden vector at one element per cycle weighs more, keeps its layers whole.
    """
    limit = MAX_PARTS if parts is None else parts
    n = max(p for p in range(1, min(limit, kv_heads) + 1) if kv_heads % p == 0)
    if n < 2:
        return 1
    hq, hk = q_heads // n, kv_heads // n

    def stream(rows, cols):  # port words of the matrix as the compiler places it: row records, or rows packed
        group = group_for(cols, cfg.group_size)
        packed = timing.gemv_packs_rows(cfg, rows, cols, fmt, group)
        return nx.matrix_bytes(rows, cols, fmt, group, cfg.port_bytes, packed) // cfg.port_bytes

    attn = timing.attn_cycles(cfg, hq, head_dim, cfg.kv_capacity) + timing.kvappend_cycles(cfg, hk, head_dim)
    qkv, o_proj = stream(hq * head_dim, hidden) + 2 * stream(hk * head_dim, hidden), stream(hidden, hq * head_dim)
    hidden_cycles = min(attn, qkv) + (n - 2) * min(attn, qkv + o_proj) + min(attn, o_proj)
    added = ((n - 1) * (timing.req_cycles(cfg, hidden, fold=1) + timing.vector_cycles("VADD", {"len": hidden}, cfg))
             + n * (hq + hk) * head_dim)
    return n if hidden_cycles > added else 1


def split_attention(og: OverlayGraph, cfg: OverlayConfig, fmt: str = "int8", parts: int | None = None) -> int:
    """Split each splittable layer's attention of *og* (in place) into :func:`parts_for` parts by KV heads (its
    weights in *fmt*); returns the number of layers split."""
    bases = kv_layout(og, cfg)
    split = 0
    for attn in [op for op in og.ops if op.kind == "attn"]:
        a = attn.attrs
        if "kv_group" in a or bases.get(a["layer"], cfg.kv_columns) >= cfg.kv_columns:
            continue
        plan = _plan(og, attn)
        if plan is None:
            continue
        n = parts_for(cfg, fmt, og.lengths[plan[1].out], a["q_heads"], a["kv_heads"], a["head_dim"], parts)
        if n > 1:
            _rewrite(og, attn, n, *plan)
            split += 1
    return split


def _uses(og: OverlayGraph) -> dict:
    uses = defaultdict(list)
    for op in og.ops:
        for v in op.ins:
            uses[v].append(op)
    for vec, _ in og.outputs.values():
        uses[vec].append(None)
    if og.logits:
        uses[og.logits].append(None)
    return uses


def _plan(og: OverlayGraph, attn: VOp):
    """``(chains, o_proj)``: per attention input the ops from its GEMV to it (the GEMV first; RoPE and bias adds
    after it, each read by the next alone), and the O projection (the attention output's only reader); or None."""
    producer = {op.out: op for op in og.ops}
    uses = _uses(og)
    chains = []
    for v in attn.ins:
        chain = []
        while True:
            op = producer.get(v)
            if op is None or uses[v] != [chain[0] if chain else attn]:
                return None
            chain.insert(0, op)
            if op.kind == "linear":
                break
            if op.kind not in ("rope", "addc"):
                return None
            v = op.ins[0]
        if chain[0].attrs["matrix"] in og.prequantized or set(chain[0].attrs) != {"matrix"}:
            return None
        chains.append(chain)
    o_proj = uses[attn.out]
    if len(o_proj) != 1 or o_proj[0] is None or o_proj[0].kind != "linear" or set(o_proj[0].attrs) != {"matrix"}:
        return None
    if o_proj[0].attrs["matrix"] in og.prequantized or o_proj[0].out == og.logits:
        return None
    return chains, o_proj[0]


def _rewrite(og: OverlayGraph, attn: VOp, n: int, chains: list, o_proj: VOp) -> None:
    a = attn.attrs
    qh, kvh, hd = a["q_heads"], a["kv_heads"], a["head_dim"]
    heads = (qh // n, kvh // n, kvh // n)  # per part: query, key and value heads

    def vector(name, length):
        og.lengths[name] = length
        return name

    def gemv(out, x, matrix, source):
        """A GEMV whose REQ comes later: its accumulators stay pending in between (Linear's ``defer``)."""
        pending = vector(f"{out}:acc", og.lengths[out])
        return Linear(pending, [x], {"matrix": matrix, "defer": True}, source), Requant(out, [pending], {}, source)

    def part(p):
        """Part *p*'s GEMVs and what follows them up to its attention (their REQs, the last GEMV's first so that
        it takes the GEMV's peak, then RoPE and bias adds), and its O projection's GEMV and REQ."""
        gemvs, reqs, rest, ins = [], [], [], []
        for chain, h in zip(chains, heads, strict=True):
            lo, hi = p * h * hd, (p + 1) * h * hd
            lin = chain[0]
            matrix = f"{lin.attrs['matrix']}:rows{lo}-{hi}"
            og.matrices[matrix] = og.matrices[lin.attrs["matrix"]][lo:hi]
            v = vector(f"{lin.out}:p{p}", hi - lo)
            g, r = gemv(v, lin.ins[0], matrix, lin.source)
            gemvs.append(g)
            reqs.insert(0, r)
            for op in chain[1:]:
                out = vector(f"{op.out}:p{p}", hi - lo)
                if op.kind == "rope":
                    rest.append(Rope(out, [v, *op.ins[1:]], {**op.attrs, "heads": h}, op.source))
                else:
                    const = f"{op.attrs['const']}:{lo}-{hi}"
                    og.consts[const] = og.consts[op.attrs["const"]][lo:hi]
                    rest.append(AddC(out, [v], {**op.attrs, "const": const}, op.source))
                v = out
            ins.append(v)
        out = vector(f"{attn.out}:p{p}", heads[0] * hd)
        rest.append(Attention(out, ins, {**a, "q_heads": heads[0], "kv_heads": heads[1], "kv_group": p * heads[1]},
                              attn.source))
        lo, hi = p * heads[0] * hd, (p + 1) * heads[0] * hd
        matrix = f"{o_proj.attrs['matrix']}:cols{lo}-{hi}"
        og.matrices[matrix] = og.matrices[o_proj.attrs["matrix"]][:, lo:hi]
        o_gemv, o_req = gemv(vector(f"{o_proj.out}:p{p}", og.lengths[o_proj.out]), out, matrix, o_proj.source)
        return gemvs, reqs + rest, o_gemv, o_req

    parts = [part(p) for p in range(n)]
    # part p's GEMVs stream while part p - 1's attention runs, and so does part p - 2's O projection; a REQ waits
    # for the attention (both write the activation buffer), so the GEMVs come first
    new = parts[0][0] + parts[0][1]
    for p in range(1, n):
        new += parts[p][0] + ([parts[p - 2][3]] if p >= 2 else []) + parts[p][1] + [parts[p - 1][2]]
    new += ([parts[n - 2][3]] if n >= 2 else []) + [parts[n - 1][2], parts[n - 1][3]]
    total = parts[0][3].out
    for p in range(1, n):
        out = o_proj.out if p == n - 1 else vector(f"{o_proj.out}:sum{p}", og.lengths[o_proj.out])
        new.append(Add(out, [total, parts[p][3].out], {}, o_proj.source))
        total = out

    old = [*(op for chain in chains for op in chain), attn, o_proj]
    gone = {id(op) for op in old}
    at = og.ops.index(attn)
    kept = [op for op in og.ops if id(op) not in gone]
    before = sum(1 for op in og.ops[:at] if id(op) not in gone)
    og.ops[:] = kept[:before] + new + kept[before:]
    # the whole matrices, bias constants and vectors that nothing reads any more
    for table, key in ((og.matrices, "matrix"), (og.consts, "const")):
        used = {op.attrs.get(key) for op in og.ops}
        for name in {op.attrs.get(key) for op in old} - used - {None}:
            del table[name]
    for op in old:
        if op.out != o_proj.out:
            del og.lengths[op.out]
