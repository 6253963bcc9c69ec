"""cocotb side of tests/test_hw_gemv.py: run one GEMV tile, read the accumulators back.

Parameters and expected results come from the JSON file named by GEMV_CASE.
"""

import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge


def _load_case() -> dict:
    with open(os.environ["GEMV_CASE"]) as f:
        return json.load(f)


def _save(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


@cocotb.test()
async def gemv_tile(dut):
    case = _load_case()
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    dut.start.value = 0
    dut.rows.value = case["rows"]
    dut.cols.value = case["cols"]
    dut.group_log2.value = case["group_log2"]
    dut.fmt.value = case["fmt"]
    dut.w_base.value = case["w_base"]
    if "packed" in case:
        dut.packed.value = case["packed"]
    dut.rd_addr.value = 0
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    await RisingEdge(dut.clk)
    dut.start.value = 1
    await RisingEdge(dut.clk)
    dut.start.value = 0
    await RisingEdge(dut.done)
    await ReadOnly()
    cycles = int(dut.cycles.value)
    await RisingEdge(dut.clk)
    got = []
    for r in range(case["rows"]):
        dut.rd_addr.value = r
        await RisingEdge(dut.clk)
        await ReadOnly()
        v = int(dut.rd_data.value)
        got.append(v - (1 << 64) if v >> 63 else v)
        await RisingEdge(dut.clk)
    _save(case["result"], {"cycles": cycles, "acc": got})
    assert got == case["expected"], "accumulators differ"
    assert cycles == case["cycles"], f"cycles {cycles} != {case['cycles']}"
