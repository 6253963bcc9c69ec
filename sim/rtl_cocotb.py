"""cocotb side of :mod:`kvoverlay.sim.rtl`: the Verilated overlay, driven at transaction level.

The job (JSON file named by ``KVO_RTL_JOB``) gives the program's base, the watchdog, the register arguments of one
run and what to read back. The clock and the memory model run in HDL; Python only writes registers, pulses
``start``, awaits ``done`` and reads results. The memory image comes in through the memory model's ``$readmemh``
and the run's memory goes out through ``$writememh`` (plusargs set by the runner).

Decode sessions do not run here: they keep one process of the run-path harness (:mod:`kvoverlay.sim.rtl_harness`)
alive, which needs no cocotb and simulates several times faster.
"""

import json
import os
import time

import cocotb
from cocotb.triggers import ReadOnly, RisingEdge, Timer, with_timeout

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


async def _registers(dut, job) -> dict:
    return {"eregs": [await _comb(dut, "dbg_ereg_data", "dbg_ereg_addr", i) for i in range(job["n_eregs"])],
            "regs": [await _comb(dut, "dbg_reg_data", "dbg_reg_addr", i) for i in range(job["n_regs"])]}


async def _state(dut, job, abuf_words, acc_words) -> dict:
    """Registers, and as many words of the buffers as asked for."""
    result = await _registers(dut, job)
    for name, count in (("abuf", abuf_words), ("acc", acc_words)):
        words = []
        for i in range(count):
            getattr(dut, f"dbg_{name}_addr").value = i
            await RisingEdge(dut.clk)
            await ReadOnly()
            words.append(int(getattr(dut, f"dbg_{name}_data").value))
            await RisingEdge(dut.clk)
        result[name] = [str(w) for w in words]
    return result


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
    result.update(await _state(dut, job, job["abuf_words"], job["acc_words"]))
    await RisingEdge(dut.clk)
    dut.dram_dump.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    _save(job["result"], result)
