"""cocotb side of :mod:`kvoverlay.sim.rtl`: one run of the Verilated overlay, driven at transaction level.

The job (JSON file named by ``KVO_RTL_JOB``) gives the register arguments, the program's base, the watchdog
and what to read back. The clock and the memory model run in HDL; Python only writes the arguments, pulses
``start``, awaits ``done`` and reads the state back. The memory image comes in and out through the memory
model's ``$readmemh``/``$writememh`` (plusargs set by the runner).

A job with a ``session`` entry runs a decode session instead: the image is loaded once and the program runs
once per step, the KV buffer and all other state persisting between steps. Per step, Python writes the token
and position registers, starts, awaits ``done`` and reads the step's counters, the next-token register and the
logits record (through the memory model's host read port); the next step's token is either the next forced
token or the register just read (greedy generation, fed back without leaving the simulator).
"""

import json
import os
import time

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge, Timer, with_timeout

CLOCK_NS = 10  # the clock runs in HDL (hw/sim_overlay.py clocked_wrapper)


async def _comb(dut, name, addr_signal, addr):
    getattr(dut, addr_signal).value = addr
    await Timer(1, unit="ns")
    return int(getattr(dut, name).value)


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _save(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


async def _write_regs(dut, values: dict):
    """Host register writes, then a one-cycle ``start``.

    Inputs change at falling edges: after the combinational reads (``_comb``, 1 ns steps) the simulation time
    may sit on a rising edge, where a write could race the edge and be lost.
    """
    for i, value in values.items():
        await FallingEdge(dut.clk)
        dut.host_reg_we.value = 1
        dut.host_reg_addr.value = int(i)
        dut.host_reg_data.value = int(value) & 0xFFFFFFFF
    await FallingEdge(dut.clk)
    dut.host_reg_we.value = 0
    dut.start.value = 1
    await FallingEdge(dut.clk)
    dut.start.value = 0


async def _status(dut, job):
    await ReadOnly()
    result = {"error": int(dut.error.value), "error_code": int(dut.error_code.value),
              "error_info": int(dut.error_info.value), "error_pc": int(dut.error_pc.value)}
    await RisingEdge(dut.clk)
    result["counters"] = [await _comb(dut, "ctr_data", "ctr_addr", i) for i in range(job["n_counters"])]
    return result


async def _state(dut, job) -> dict:
    """Registers, and the buffers as far as the job asks."""
    result = {"eregs": [await _comb(dut, "dbg_ereg_data", "dbg_ereg_addr", i) for i in range(job["n_eregs"])],
              "regs": [await _comb(dut, "dbg_reg_data", "dbg_reg_addr", i) for i in range(job["n_regs"])]}
    for name, count in (("abuf", job["abuf_words"]), ("acc", job["acc_words"])):
        words = []
        for i in range(count):
            getattr(dut, f"dbg_{name}_addr").value = i
            await RisingEdge(dut.clk)
            await ReadOnly()
            words.append(int(getattr(dut, f"dbg_{name}_data").value))
            await RisingEdge(dut.clk)
        result[name] = [str(w) for w in words]
    return result


async def _session(dut, job):
    """One decode session: a run of the program per step, tokens fed back in the simulator."""
    sess = job["session"]
    regs = sess["registers"]
    feed = list(sess["feed"])
    steps = len(feed) + sess["generate"]
    first, words = sess["logits_word"], sess["logits_words"]
    out = []
    token = None
    for k in range(steps):
        token = feed[k] if k < len(feed) else token
        await _write_regs(dut, {regs["token"]: token, regs["position"]: sess["position"] + k})
        t0, c0 = time.perf_counter(), time.process_time()
        await with_timeout(RisingEdge(dut.done), job["max_cycles"] * CLOCK_NS, "ns")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        step = {"token": token, "wall_s": wall, "cpu_s": cpu, **await _status(dut, job)}
        out.append(step)
        if step["error"]:
            break
        step["next_token"] = await _comb(dut, "dbg_reg_data", "dbg_reg_addr", regs["next_token"])
        step["logits"] = [str(await _comb(dut, "dram_host_data", "dram_host_addr", first + i)) for i in range(words)]
        token = step["next_token"]
    _save(job["result"], {"steps": out, **await _state(dut, job)})


@cocotb.test()
async def overlay_run(dut):
    job = _load(os.environ["KVO_RTL_JOB"])
    dut.rst.value = 1
    for sig in ("start", "host_reg_we", "dram_dump", "dbg_abuf_addr", "dbg_acc_addr", "dbg_ereg_addr",
                "dbg_reg_addr", "ctr_addr", "dram_host_addr"):
        getattr(dut, sig).value = 0
    dut.prog_base.value = job["prog_base"]
    dut.watchdog_cycles.value = job["watchdog"]
    dut.dram_dump_words.value = job["dump_words"]
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    if "session" in job:
        await _session(dut, job)
        return
    for i, value in enumerate(job["args"]):
        dut.host_reg_we.value = 1
        dut.host_reg_addr.value = i
        dut.host_reg_data.value = value & 0xFFFFFFFF
        await RisingEdge(dut.clk)
    dut.host_reg_we.value = 0
    dut.start.value = 1
    await RisingEdge(dut.clk)
    dut.start.value = 0
    t0, c0 = time.perf_counter(), time.process_time()
    await with_timeout(RisingEdge(dut.done), job["max_cycles"] * CLOCK_NS, "ns")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await ReadOnly()
    result = {"wall_s": wall, "cpu_s": cpu, "error": int(dut.error.value), "error_code": int(dut.error_code.value),
              "error_info": int(dut.error_info.value), "error_pc": int(dut.error_pc.value)}
    await RisingEdge(dut.clk)
    result["counters"] = [await _comb(dut, "ctr_data", "ctr_addr", i) for i in range(job["n_counters"])]
    result.update(await _state(dut, job))
    await RisingEdge(dut.clk)
    dut.dram_dump.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    _save(job["result"], result)
