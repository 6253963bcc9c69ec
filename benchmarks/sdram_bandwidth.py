"""Bytes per cycle the board's SDRAM delivers to the overlay's burst port, in Amaranth's simulator.

Usage::

    python benchmarks/sdram_bandwidth.py [--config ulx3s] [--words 4096] [--pattern stream bursts]

:class:`~kvoverlay.boards.sdram.SdramMemory` (the controller and the width adapter) with
:class:`~kvoverlay.boards.sdram.SdramModel` on its pins, the part's timing at the config's clock
(:func:`~kvoverlay.boards.sdram.sdram_timing`, short power-up wait). Patterns: ``stream``, one read burst of
``--words`` port words from address 0 (a GEMV's weight stream); ``bursts``, read bursts of 1-16 port words at random
addresses (the short LOAD/LDROW reads of a decode step), ``--words`` in all. Each prints one JSON line: cycles from
the request to the last beat, bytes, bytes per cycle, MB/s at the config's clock and the model's verdict.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator
from kvoverlay.boards.sdram import SdramMemory, SdramModel, sdram_timing

from kvoverlay.config import load_config


def measure(config, words: int, pattern: str, *, depth: int = 1 << 16, seed: int = 0) -> dict:
    timing = sdram_timing(config.clock_mhz, init=64)
    m = Module()
    m.submodules.mem = mem = SdramMemory(config, depth, timing)
    m.submodules.model = model = SdramModel(timing, depth * config.port_bits // 16)
    wiring.connect(m, mem.pins, model.pins)
    rng = random.Random(seed)
    bursts = [(0, words)] if pattern == "stream" else []
    while sum(n for _, n in bursts) < words:
        bursts.append((rng.randrange(depth - 16), min(rng.randrange(1, 17), words - sum(n for _, n in bursts))))
    out = {}

    async def tb(ctx):
        await ctx.tick().until(mem.ready)
        p, cycles = mem.port, 0
        for addr, length in bursts:
            ctx.set(p.req.payload.addr, addr)
            ctx.set(p.req.payload.len, length)
            ctx.set(p.req.payload.write, 0)
            ctx.set(p.req.valid, 1)
            await ctx.tick().until(p.req.ready)
            ctx.set(p.req.valid, 0)
            cycles += 1
            got = 0
            while got < length:
                await ctx.tick()
                cycles += 1
                got += ctx.get(p.rd.valid)
        out.update(cycles=cycles, error=ctx.get(model.error).name, acts=ctx.get(model.acts))

    sim = Simulator(m)
    sim.add_clock(1e-6 / config.clock_mhz)
    sim.add_testbench(tb)
    t0 = time.perf_counter()
    sim.run()
    nbytes = words * config.port_bytes
    return {"config": config.name, "clock_mhz": config.clock_mhz, "pattern": pattern, "port_words": words,
            "bursts": len(bursts), "bytes": nbytes, "cycles": out["cycles"],
            "bytes_per_cycle": round(nbytes / out["cycles"], 4),
            "mb_per_s": round(nbytes / out["cycles"] * config.clock_mhz, 1),
            "port_bytes_per_cycle": config.port_bytes, "activates": out["acts"], "model_error": out["error"],
            "sim_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="ulx3s")
    ap.add_argument("--words", type=int, default=4096, help="port words read in all")
    ap.add_argument("--pattern", nargs="+", default=["stream", "bursts"], choices=("stream", "bursts"))
    args = ap.parse_args(argv)
    config = load_config(args.config)
    for pattern in args.pattern:
        print(json.dumps(measure(config, args.words, pattern)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
