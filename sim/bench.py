"""``kvoverlay bench gemv``: a tiled GEMV program on the RTL or the golden model, against the port roofline."""

from __future__ import annotations

import json
import sys

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import WEIGHT_FORMATS, load_config
from kvoverlay.roofline import Roofline, bandwidth_efficiency, roofline_cycles

__all__ = ["bench_gemv", "bench_gemv_main", "gemv_program"]

X_ADDR = 0x100


def _group(config, fmt: str) -> int:
    """The config's group size, raised to one port word of weights: the bench measures the window-wide path
    (groups narrower than a window take ``timing.gemv_narrow_stages`` more cycles per GEMV)."""
    window = config.port_bytes * 8 // WEIGHT_FORMATS[fmt]
    return max(config.group_size, window)


def gemv_program(config, rows: int, cols: int, fmt: str, seed: int = 0):
    """(program, image, weight bytes): LOAD x, then one GEMV per tile of at most acc_buffer_words rows."""
    if fmt not in config.weight_formats:
        raise ValueError(f"weights={fmt!r} is not built into config {config.name} ({', '.join(config.weight_formats)})")
    if rows < 1 or cols < 1:
        raise ValueError(f"rows={rows}, cols={cols}: both must be positive")
    group = _group(config, fmt)
    if cols % group:
        raise ValueError(f"cols={cols} is not a multiple of the group size {group}")
    if cols > config.act_buffer_words:
        raise ValueError(f"cols={cols} exceeds the activation buffer ({config.act_buffer_words} elements)")
    rng = np.random.default_rng(seed)
    pb = config.port_bytes
    stride = nx.row_stride(cols, fmt, group, pb)
    x_rec = nx.pack_vector_record(rng.integers(-nx.MANT_MAX, nx.MANT_MAX + 1, cols), -15)
    w_base = -(-(X_ADDR + len(x_rec)) // 4096) * 4096
    lo, hi = -(1 << (WEIGHT_FORMATS[fmt] - 1)), 1 << (WEIGHT_FORMATS[fmt] - 1)
    q = rng.integers(lo, hi, (rows, cols))
    sm = rng.integers(1, 1 << 16, (rows, cols // group))
    weights = nx.pack_rows(q, sm, fmt, group, pb)
    if w_base + len(weights) > config.dram_bytes // 2:
        raise ValueError(f"{rows}x{cols} {fmt} weights ({len(weights)} bytes) do not fit in half of dram_bytes={config.dram_bytes}")
    image = bytearray(w_base + len(weights))
    image[X_ADDR:X_ADDR + len(x_rec)] = x_rec
    image[w_base:] = weights
    tile = config.acc_buffer_words
    lg_group = group.bit_length() - 1 - (isa.GROUP_BASE.bit_length() - 1)
    program = [isa.Instr("LOAD", {"addr": X_ADDR, "len": cols, "dst": 0, "dst_e": 1}, frozenset({"push_next"}))]
    for i, r0 in enumerate(range(0, rows, tile)):
        n = min(tile, rows - r0)
        program.append(isa.Instr("GEMV", {
            "addr": w_base + r0 * stride, "rows": n, "cols": cols, "fmt": isa.ENUMS["fmt"].index(fmt),
            "lg_group": lg_group, "sexp": -8, "x": 0, "x_e": 1, "acc": 0, "acc_e": 2, "accumulate": 0,
        }, frozenset({"pop_prev"}) if i == 0 else frozenset()))
    program.append(isa.Instr("END"))
    return program, bytes(image), len(weights)


def bench_gemv(config, rows: int, cols: int, fmt: str, backend: str = "rtl", seed: int = 0) -> dict:
    from kvoverlay.sim.golden import GoldenModel

    if backend not in ("rtl", "isa"):
        raise ValueError(f"backend={backend!r}: expected rtl or isa")
    program, image, wbytes = gemv_program(config, rows, cols, fmt, seed)
    gold = GoldenModel(config, image)
    golden_cycles = gold.run(program).cycles
    required = Roofline(config, program).required_bytes()
    roofline = roofline_cycles(config, required)
    out = {"rows": rows, "cols": cols, "weights": fmt, "backend": backend, "config": config.name,
           "group": _group(config, fmt), "weight_bytes": wbytes, "bytes_required": required,
           "roofline_cycles": roofline, "golden_cycles": golden_cycles}
    if backend == "isa":
        cycles = golden_cycles
    else:
        from kvoverlay.sim.rtl import RtlModel

        rtl = RtlModel(config, image)
        counters = rtl.run(program)
        cycles = counters.cycles
        last = rows - (rows - 1) // config.acc_buffer_words * config.acc_buffer_words  # rows of the last tile
        out.update({"sim_cycles_per_s": round(rtl.last_run.sim_cycles_per_s),
                    "sim_cycles_per_cpu_s": round(rtl.last_run.sim_cycles_per_cpu_s), "wall_s": round(rtl.last_run.wall_s, 3),
                    "bit_exact": bool(np.array_equal(rtl.acc[:last], gold.acc[:last]) and rtl.eregs == gold.eregs),
                    "busy": counters.busy})
    out["cycles"] = cycles
    out["bandwidth_efficiency"] = round(bandwidth_efficiency(roofline, cycles), 4)
    return out


def bench_gemv_main(args) -> int:
    config = load_config(args.config)
    res = bench_gemv(config, args.rows, args.cols, args.weights, args.backend, args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        extra = ""
        if args.backend == "rtl":
            extra = f", {res['sim_cycles_per_s']} simulated cycles/s, bit-exact with the golden model: {res['bit_exact']}"
        print(f"gemv {res['rows']}x{res['cols']} {res['weights']} on {res['config']} ({res['backend']}): "
              f"{res['cycles']} cycles, roofline {res['roofline_cycles']:.0f}, efficiency {res['bandwidth_efficiency']:.1%}, "
              f"golden model predicts {res['golden_cycles']}{extra}")
    sys.stdout.flush()
    return 0
