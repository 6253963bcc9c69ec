"""cocotb side of tests/test_hw_vector_unit.py: run a list of vector-unit cases on one simulator.

For each case from the JSON file named by VEC_CASES: write the buffer words, exponent and
scalar registers through the host ports, send one instruction on ``cmd``, await ``done``, read back
its fault, the cycle count, the buffer window and every register.
"""

import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) else v


def _load_spec() -> dict:
    with open(os.environ["VEC_CASES"]) as f:
        return json.load(f)


def _save(path: str, results: list) -> None:
    with open(path, "w") as f:
        json.dump(results, f)


@cocotb.test()
async def vector_cases(dut):
    spec = _load_spec()
    exp_bits = spec["exp_bits"]
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    for name in ("cmd__valid", "host__abuf_w__en", "host__ereg_w__en", "host__reg_w__en"):
        getattr(dut, name).value = 0
    dut.cmd__payload.value = 0
    dut.host__abuf_r__en.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    results = []
    for case in spec["cases"]:
        dut.host__abuf_w__en.value = (1 << len(dut.host__abuf_w__en)) - 1
        for addr, word in case["words"]:
            dut.host__abuf_w__addr.value = addr
            dut.host__abuf_w__data.value = word
            await RisingEdge(dut.clk)
        dut.host__abuf_w__en.value = 0
        dut.host__ereg_w__en.value = 1
        for i, e in enumerate(case["eregs"]):
            dut.host__ereg_w__addr.value = i
            dut.host__ereg_w__data.value = e & ((1 << exp_bits) - 1)
            await RisingEdge(dut.clk)
        dut.host__ereg_w__en.value = 0
        dut.host__reg_w__en.value = 1
        for i, r in enumerate(case["regs"]):
            dut.host__reg_w__addr.value = i
            dut.host__reg_w__data.value = r & 0xFFFFFFFF
            await RisingEdge(dut.clk)
        dut.host__reg_w__en.value = 0
        dut.cmd__payload.value = case["insn"]
        dut.cmd__valid.value = 1  # ready while idle: taken at this edge
        await RisingEdge(dut.clk)
        dut.cmd__valid.value = 0
        await RisingEdge(dut.done)
        await ReadOnly()
        out = {"fault": int(dut.fault.value)}
        await RisingEdge(dut.clk)  # register writes land in the done cycle, which the counter now includes
        await ReadOnly()
        out["cycles"] = int(dut.cycles.value)
        await RisingEdge(dut.clk)
        words = []
        for addr, _ in case["words"]:
            dut.host__abuf_r__addr.value = addr
            await RisingEdge(dut.clk)
            await ReadOnly()
            words.append(int(dut.host__abuf_r__data.value))
            await RisingEdge(dut.clk)
        out["words"] = words
        eregs, regs = [], []
        for i in range(len(case["eregs"])):
            dut.host__ereg_r__addr.value = i
            await ReadOnly()
            eregs.append(_signed(int(dut.host__ereg_r__data.value), exp_bits))
            await RisingEdge(dut.clk)
        for i in range(len(case["regs"])):
            dut.host__reg_r__addr.value = i
            await ReadOnly()
            regs.append(int(dut.host__reg_r__data.value))
            await RisingEdge(dut.clk)
        out["eregs"], out["regs"] = eregs, regs
        results.append(out)
    _save(spec["result"], results)
