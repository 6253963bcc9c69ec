"""The compiler as one list of passes, ONNX model to program bundle.

:data:`PIPELINE` reads top to bottom. :func:`run_pipeline` runs it over one :class:`Compilation`
(the options, then what each pass made), times every pass and, given a dump folder, writes each
pass's output as ``NN_<name>.txt`` (``.s`` for instruction listings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
import onnx.printer

from kvoverlay import bundle as kvbundle
from kvoverlay import isa
from kvoverlay.config import OverlayConfig

from .codegen import (
    REG_KV_LEN,
    REG_KV_SLOT,
    REG_NEXT,
    REG_POSITION,
    REG_TOKEN,
    Codegen,
    check_fits,
    emit,
    fold_peaks,
    insert_tokens,
    kv_registers,
    plan_memory,
)
from .frontend import CompileError, Loaded, load_split
from .fuse import fuse
from .ir import Graph
from .lower import lower
from .overlay_graph import OverlayGraph
from .partition import host_model, partition
from .quantize import SEARCHED, Image, calibrate, quantize
from .simplify import dead_code, fold_constants, specialize_mask
from .split_attention import split_attention

__all__ = ["PIPELINE", "Compilation", "Pass", "run_passes", "run_pipeline"]

log = logging.getLogger(__name__)


@dataclass
class Compilation:
    """What the passes share: the options of the compile, then each stage's product."""

    model: str | os.PathLike | onnx.ModelProto
    cfg: OverlayConfig | None = None
    kv_len: int | None = None  # the past length the graph is traced at
    max_seq: int | None = None
    weights: str = "w16"
    group_size: int | None = None
    method: str = "mse"
    host_ops: bool = True  # place what the overlay refuses on the host (False: the refusal is the error)
    host_nodes: frozenset = frozenset()  # nodes placed on the host from the start (a later pass refused them)
    logits: bool = True  # False: the program leaves no logits, only the next token (codegen.plan_memory)
    loaded: Loaded | None = None  # frontend (consumed by lower)
    graph: Graph | None = None  # lower, then rewritten by specialize_mask, fold_constants, dead_code
    og: OverlayGraph | None = None  # partition (the whole graph fused) or fuse
    segments: list | None = None  # partition, when some nodes go to the host: (Segment, Bundle or ONNX model)
    samples: dict | None = None  # calibrate: matrix -> GEMV inputs [n, cols], or None
    image: Image | None = None  # quantize (plan_memory adds the I/O records)
    codegen: Codegen | None = None  # plan_memory (emit allocates through it)
    code: list = field(default_factory=list)  # emit (insert_tokens adds the tokens)
    bundle: kvbundle.Bundle | None = None  # bundle
    seconds: dict = field(default_factory=dict)  # pass name -> wall time


@dataclass(frozen=True)
class Pass:
    """A named step of the pipeline: *run* updates the Compilation, *dump* shows what it made."""

    name: str
    run: Callable[[Compilation], None]
    dump: Callable[[Compilation], str]
    suffix: str = ".txt"


# ---------------------------------------------------------------- the passes, as steps over a Compilation
def _frontend(c: Compilation) -> None:
    c.loaded = load_split(c.model, kv_len=c.kv_len)


def _lower(c: Compilation) -> None:
    c.graph, c.loaded = lower(c.loaded, host_ops=c.host_ops), None  # the graph holds the weights now


def _on_graph(transform: Callable[[Graph], Graph]) -> Callable[[Compilation], None]:
    """A pass rewriting the IR graph, checked after (SSA form, topological order)."""
    def run(c: Compilation) -> None:
        c.graph = transform(c.graph)
        c.graph.verify()
    return run


def _partition(c: Compilation) -> None:
    """Fuse; what the overlay refuses goes to the host, and each overlay segment becomes a program of its own.

    A graph the overlay runs whole goes on through the passes below as it always did (``partition`` keeps its fused
    graph); each segment of a partitioned one is compiled by the passes from ``fuse`` on, whose refusals name the
    node to place on the host as the fuser's do.
    """
    def trial(g: Graph, whole: bool = False):
        if whole:
            return fuse(g, max_seq=c.max_seq, lanes=c.cfg.vector_lanes, norm_heads=c.cfg.norm_heads)
        sub = Compilation(None, cfg=c.cfg, kv_len=c.kv_len, max_seq=c.max_seq, weights=c.weights,
                          group_size=c.group_size, method=c.method, host_ops=False, graph=g)
        return run_pipeline(sub, start="fuse").bundle

    segs, made = partition(c.graph, trial, host_ops=c.host_ops, host=c.host_nodes)
    if len(segs) == 1 and segs[0].kind == "overlay":
        c.og = made[0]
        return
    c.segments = [(s, host_model(c.graph, s) if s.kind == "host" else made[k]) for k, s in enumerate(segs)]


def _whole(run: Callable[[Compilation], None]) -> Callable[[Compilation], None]:
    """A pass over the whole graph's program: a partitioned compile made its segments' programs in ``partition``."""
    def step(c: Compilation) -> None:
        if c.segments is None:
            run(c)
    return step


def _fuse(c: Compilation) -> None:
    if c.og is None:
        c.og = fuse(c.graph, max_seq=c.max_seq, lanes=c.cfg.vector_lanes, norm_heads=c.cfg.norm_heads)


def _split_attention(c: Compilation) -> None:
    split_attention(c.og, c.cfg, c.weights)


def _calibrate(c: Compilation) -> None:
    """Only int4 with the mse scale search uses calibration inputs, and only a decoder (token table) has any."""
    decoder = any(kind == "token" for kind, _ in c.og.tables.values())
    c.samples = calibrate(c.og, c.max_seq) if c.weights in SEARCHED and c.method == "mse" and decoder else None


def _quantize(c: Compilation) -> None:
    check_fits(c.og, c.cfg, c.group_size)
    c.image = quantize(c.og, c.cfg, weights=c.weights, group_size=c.group_size, method=c.method, samples=c.samples)


def _plan_memory(c: Compilation) -> None:
    c.codegen = plan_memory(c.og, c.cfg, c.image, c.max_seq, logits=c.logits)


def _emit(c: Compilation) -> None:
    try:
        c.code = emit(c.codegen)
    except CompileError as exc:  # out of registers or buffer: the op being emitted is the one to place elsewhere
        if exc.node is None:
            exc.node = next((op.source for op in c.og.ops
                             if c.codegen.who == f"op {op.out} ({op.kind} from {op.source})"), None)
        raise


def _fold_peaks(c: Compilation) -> None:
    fold_peaks(c.code)


def _insert_tokens(c: Compilation) -> None:
    insert_tokens(c.code)


def _source(c: Compilation) -> dict:
    digest = None
    if isinstance(c.model, (str, os.PathLike)):
        with open(c.model, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"sha256": digest, "name": os.path.basename(c.model) if digest else None}


def _segmented_bundle(c: Compilation) -> kvbundle.Bundle:
    """A partitioned program: no instructions of its own; its image holds each segment's blob back to back (an
    overlay segment's program bundle, a host segment's ONNX model), and ``segments`` says where and in what order."""
    blobs, segments, overlay_kinds, host = bytearray(), [], set(), []
    for s, made in c.segments:
        blob = kvbundle.to_bytes(made) if s.kind == "overlay" else made.SerializeToString(deterministic=True)
        entry = {"kind": s.kind, "blob": [len(blobs), len(blob)], "inputs": list(s.inputs), "outputs": list(s.outputs)}
        if s.kind == "host":
            entry["nodes"] = [[n.name, n.op] for n in s.nodes]
            host += entry["nodes"]
        else:
            overlay_kinds.update(made.manifest["placement"]["overlay"])
        segments.append(entry)
        blobs += blob + bytes(-len(blob) % 16)

    def shape(name):
        return [d if isinstance(d, int) else None for d in c.graph.values[name].shape or ()]

    meta = {
        "io": {"inputs": {i: {"shape": shape(i), "dtype": c.graph.values[i].dtype} for i in c.graph.inputs},
               "outputs": {o: {"shape": shape(o), "dtype": c.graph.values[o].dtype} for o in c.graph.outputs}},
        "segments": segments,
        "placement": {"overlay": sorted(overlay_kinds), "host": host},
        "max_seq": c.max_seq,
        "weights": {"format": c.weights, "group_size": c.group_size},
        "weight_bytes": 0,
        "source": _source(c),
    }
    return kvbundle.Bundle(config=c.cfg, instructions=[], image=bytes(blobs), manifest=meta)


def _bundle(c: Compilation) -> None:
    if c.segments is not None:
        c.bundle = _segmented_bundle(c)
        return
    og, io, image = c.og, c.codegen.io, c.image
    meta = {
        "registers": {"token": REG_TOKEN, "position": REG_POSITION, "next_token": REG_NEXT,
                      **({"kv_slot": REG_KV_SLOT, "kv_len": REG_KV_LEN} if kv_registers(c.cfg, c.max_seq) else {})},
        "io": io,
        "regions": image.regions,
        "abuf_peak_words": c.codegen.abuf.peak,
        "weights": {"format": c.weights, "group_size": c.group_size,
                    "method": c.method if c.weights in SEARCHED else "rtn", "table_format": image.table_fmt},
        "weight_bytes": image.regions[0][2] - image.regions[0][1],
        "max_seq": c.max_seq,
        "kv": {"layers": {str(k): {"kv_heads": v["kv_heads"], "head_dim": v["head_dim"],
                                   "kv_base": c.codegen.kv_bases[k], "columns": v["kv_heads"] * c.cfg.kv_head_columns(v["head_dim"])}
                          for k, v in sorted(og.kv.items())},
               "capacity": c.cfg.kv_capacity, "pool_columns": c.cfg.kv_columns, "column_lanes": c.cfg.vector_lanes},
        "registers_in": {"input_ids": "R0", "position_ids": "R1"} if og.logits else {},
        "placement": {"overlay": sorted({op.kind for op in og.ops}), "host": []},
        "source": _source(c),
    }
    if og.logits:
        meta["logits"] = {k: v for k, v in io["outputs"]["logits"].items() if k in ("addr", "len", "tiles")}
    c.bundle = kvbundle.Bundle(config=c.cfg, instructions=c.code, image=image.data, manifest=meta)


# ---------------------------------------------------------------- what each pass made, as text
def _dump_loaded(c: Compilation) -> str:
    return onnx.printer.to_text(c.loaded.model.graph) + "\n" + "".join(
        f"weight {n}: {a.dtype}{list(a.shape)}\n" for n, a in c.loaded.weights.items())


def _partitioned(dump: Callable[[Compilation], str]) -> Callable[[Compilation], str]:
    def show(c: Compilation) -> str:
        if c.segments is None:
            return dump(c)
        return "partitioned: each overlay segment is compiled on its own (see the partition dump)\n"
    return show


def _dump_partition(c: Compilation) -> str:
    if c.segments is None:
        return "one overlay segment: the overlay runs every node\n"
    lines = []
    for k, (s, _) in enumerate(c.segments):
        lines.append(f"segment {k}: {s.kind}, reads {', '.join(s.inputs) or '-'}; gives {', '.join(s.outputs)}")
        lines += [f"  {n.name}: {n.op}" for n in s.nodes]
    return "\n".join(lines) + "\n"


def _dump_samples(c: Compilation) -> str:
    if c.samples is None:
        return "no calibration (only int4 or uint4 --quant mse of a decoder calibrates)\n"
    return "".join(f"matrix {n}: {x.shape[0]} input vectors of {x.shape[1]}\n" for n, x in c.samples.items())


def _dump_image(c: Compilation) -> str:
    lines = [f"image: {len(c.image.data)} bytes, tables in {c.image.table_fmt}"]
    lines += [f"region {name}: [{lo:#x}, {hi:#x})" for name, lo, hi in c.image.regions]
    for name, r in c.image.records.items():
        lines.append(f"const  {name} @ {r:#x}" if isinstance(r, int) else
                     f"matrix {name} @ {r.addr:#x}: {r.rows}x{r.cols} {r.fmt} group {r.group} sexp {r.sexp}")
    return "\n".join(lines) + "\n"


def _dump_plan(c: Compilation) -> str:
    cg = c.codegen
    lines = [f"accumulator rows {cg.acc_rows}, attention statistics at {cg.stats_addr}"]
    lines += [f"{kind[:-1]} {name} @ {r['addr']:#x}: [{r['len']}]" for kind, recs in cg.io.items()
              for name, r in recs.items()]
    lines += [f"last use of {v}: op {i}" for v, i in cg.last_use.items()]
    return "\n".join(lines) + "\n"


def _dump_code(c: Compilation) -> str:
    return isa.disassemble(c.code)


def _dump_manifest(c: Compilation) -> str:
    return json.dumps(c.bundle.manifest, indent=1, sort_keys=True) + "\n"


def _dump_graph(c: Compilation) -> str:
    return c.graph.dump()


def _dump_overlay(c: Compilation) -> str:
    return c.og.dump()


PIPELINE = [
    Pass("frontend", _frontend, _dump_loaded),  # load, check, pin batch/sequence/past length, infer shapes
    Pass("lower", _lower, _dump_graph),  # ONNX -> IR
    Pass("specialize_mask", _on_graph(specialize_mask), _dump_graph),
    Pass("fold_constants", _on_graph(fold_constants), _dump_graph),
    Pass("dead_code", _on_graph(dead_code), _dump_graph),
    Pass("partition", _partition, _dump_partition),  # what the overlay refuses -> host segments
    Pass("fuse", _whole(_fuse), _partitioned(_dump_overlay)),  # IR -> overlay operations
    # each layer's attention by KV group, between GEMVs it does not need, for the store queue to run beside them
    Pass("split_attention", _whole(_split_attention), _partitioned(_dump_overlay)),
    Pass("calibrate", _whole(_calibrate), _partitioned(_dump_samples)),
    Pass("quantize", _whole(_quantize), _partitioned(_dump_image)),  # matrices, tables, constants -> memory image
    Pass("plan_memory", _whole(_plan_memory), _partitioned(_dump_plan)),
    Pass("emit", _whole(_emit), _partitioned(_dump_code), ".s"),  # overlay operations -> instructions
    Pass("fold_peaks", _whole(_fold_peaks), _partitioned(_dump_code), ".s"),  # REQs that take their GEMV's peak
    Pass("insert_tokens", _whole(_insert_tokens), _partitioned(_dump_code), ".s"),
    Pass("bundle", _bundle, _dump_manifest),
]


def run_pipeline(c: Compilation, dump_dir: str | os.PathLike | None = None, *, start: str | None = None,
                 until: str | None = None) -> Compilation:
    """Run :data:`PIPELINE` on *c* (from the pass named *start*, through the one named *until*, if given); dump
    each pass into *dump_dir*."""
    names = [p.name for p in PIPELINE]
    for what, name in (("start", start), ("until", until)):
        if name is not None and name not in names:
            raise ValueError(f"{what}={name!r}: no such pass; passes: {', '.join(names)}")
    if dump_dir is not None:
        os.makedirs(dump_dir, exist_ok=True)
    first = names.index(start) if start is not None else 0
    for i, p in enumerate(PIPELINE):
        if i < first:
            continue
        t0 = time.perf_counter()
        p.run(c)
        c.seconds[p.name] = time.perf_counter() - t0
        log.debug("%-16s %8.3f s", p.name, c.seconds[p.name])
        if dump_dir is not None:
            with open(os.path.join(dump_dir, f"{i:02d}_{p.name}{p.suffix}"), "w") as f:
                f.write(p.dump(c))
        if p.name == until:
            break
    return c


def run_passes(model, dump_dir: str | os.PathLike | None = None, *, kv_len: int | None = None) -> Graph:
    """The passes up to the folded IR graph (frontend to dead_code) on *model* (a path or ModelProto)."""
    return run_pipeline(Compilation(model, kv_len=kv_len), dump_dir, until="dead_code").graph
