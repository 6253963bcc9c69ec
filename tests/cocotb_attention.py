"""cocotb side of tests/test_hw_attention.py: load state, run instructions, read state back.

The case (initial activation-buffer words, registers, instruction words, what to read back)
comes from the JSON file named by ATTN_CASE; the result goes to the file it names.
"""

import json
import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge, with_timeout


def _load_case() -> dict:
    with open(os.environ["ATTN_CASE"]) as f:
        return json.load(f)


def _save(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


def _mask(value: int, bits: int) -> int:
    return value & ((1 << bits) - 1)


async def _read_seq(dut, set_addr, get_data, addrs):
    """Pipelined reads of a latency-1 port: one address per cycle."""
    out = []
    if not addrs:
        return out
    set_addr(addrs[0])
    for i in range(len(addrs)):
        await RisingEdge(dut.clk)
        if i + 1 < len(addrs):
            set_addr(addrs[i + 1])
        await ReadOnly()
        out.append(get_data())
    await RisingEdge(dut.clk)
    return out


@cocotb.test()
async def attention_case(dut):
    case = _load_case()
    Clock(dut.clk, 10, unit="ns").start()
    ew = len(dut.host_ereg_wdata)
    for sig in (dut.cmd__valid, dut.host_abuf_we, dut.host_ereg_we, dut.host_reg_we):
        sig.value = 0
    dut.rst.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0

    # bulk state load, one word or register per cycle
    dut.host_abuf_we.value = 1
    for addr, word in case["abuf"]:
        dut.host_abuf_waddr.value = addr
        dut.host_abuf_wdata.value = word
        await RisingEdge(dut.clk)
    dut.host_abuf_we.value = 0
    dut.host_ereg_we.value = 1
    for idx, val in case["eregs"]:
        dut.host_ereg_addr.value = idx
        dut.host_ereg_wdata.value = _mask(val, ew)
        await RisingEdge(dut.clk)
    dut.host_ereg_we.value = 0
    dut.host_reg_we.value = 1
    for idx, val in case["regs"]:
        dut.host_reg_addr.value = idx
        dut.host_reg_wdata.value = _mask(val, 32)
        await RisingEdge(dut.clk)
    dut.host_reg_we.value = 0

    # each instruction: one command transfer, then the whole run in HDL until done
    instrs = []
    for word in case["program"]:
        dut.cmd__payload.value = word
        dut.cmd__valid.value = 1
        await RisingEdge(dut.clk)
        while not dut.cmd__ready.value:
            await RisingEdge(dut.clk)
        dut.cmd__valid.value = 0
        await with_timeout(RisingEdge(dut.done), 2, "ms")
        await ReadOnly()
        instrs.append({"cycles": int(dut.cycles.value), "fault": int(dut.fault.value)})
        await RisingEdge(dut.clk)

    def set_abuf(a):
        dut.host_abuf_raddr.value = a

    def set_acc(a):
        dut.host_acc_raddr.value = a

    def set_kv(c):
        dut.host_kv__layer.value, dut.host_kv__head.value, dut.host_kv__pos.value, dut.host_kv__chunk.value = c

    abuf = await _read_seq(dut, set_abuf, lambda: int(dut.host_abuf_rdata.value), case["read_abuf"])
    acc = await _read_seq(dut, set_acc, lambda: int(dut.host_acc_rdata.value), case["read_acc"])
    kv = await _read_seq(dut, set_kv, lambda: [int(dut.host_kv__k_data.value), int(dut.host_kv__v_data.value),
                                               dut.host_kv__ek.value.to_signed(), dut.host_kv__ev.value.to_signed()],
                         case["read_kv"])
    eregs = []
    for idx in range(case["num_eregs"]):
        dut.host_ereg_addr.value = idx
        await RisingEdge(dut.clk)
        await ReadOnly()
        eregs.append(dut.host_ereg_rdata.value.to_signed())
        await RisingEdge(dut.clk)
    _save(case["result"], {"instrs": instrs, "abuf": abuf, "acc": acc, "kv": kv, "eregs": eregs})
