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
    ew = len(dut.host__ereg_w__data)
    dut.host__abuf_r__en.value = dut.host__acc_r__en.value = 1
    for sig in (dut.cmd__valid, dut.host__abuf_w__en, dut.host__ereg_w__en, dut.host__reg_w__en):
        sig.value = 0
    dut.rst.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0

    # bulk state load, one word or register per cycle
    dut.host__abuf_w__en.value = (1 << len(dut.host__abuf_w__en)) - 1
    for addr, word in case["abuf"]:
        dut.host__abuf_w__addr.value = addr
        dut.host__abuf_w__data.value = word
        await RisingEdge(dut.clk)
    dut.host__abuf_w__en.value = 0
    dut.host__ereg_w__en.value = 1
    for idx, val in case["eregs"]:
        dut.host__ereg_w__addr.value = idx
        dut.host__ereg_w__data.value = _mask(val, ew)
        await RisingEdge(dut.clk)
    dut.host__ereg_w__en.value = 0
    dut.host__reg_w__en.value = 1
    for idx, val in case["regs"]:
        dut.host__reg_w__addr.value = idx
        dut.host__reg_w__data.value = _mask(val, 32)
        await RisingEdge(dut.clk)
    dut.host__reg_w__en.value = 0

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
        dut.host__abuf_r__addr.value = a

    def set_acc(a):
        dut.host__acc_r__addr.value = a

    def set_kv(c):
        (dut.host_kv__base.value, dut.host_kv__head.value, dut.host_kv__cols.value, dut.host_kv__pos.value,
         dut.host_kv__chunk.value) = c

    abuf = await _read_seq(dut, set_abuf, lambda: int(dut.host__abuf_r__data.value), case["read_abuf"])
    acc = await _read_seq(dut, set_acc, lambda: int(dut.host__acc_r__data.value), case["read_acc"])
    kv = await _read_seq(dut, set_kv, lambda: [int(dut.host_kv__k_data.value), int(dut.host_kv__v_data.value),
                                               dut.host_kv__ek.value.to_signed(), dut.host_kv__ev.value.to_signed()],
                         case["read_kv"])
    eregs = []
    for idx in range(case["num_eregs"]):
        dut.host__ereg_r__addr.value = idx
        await RisingEdge(dut.clk)
        await ReadOnly()
        eregs.append(dut.host__ereg_r__data.value.to_signed())
        await RisingEdge(dut.clk)
    _save(case["result"], {"instrs": instrs, "abuf": abuf, "acc": acc, "kv": kv, "eregs": eregs})
