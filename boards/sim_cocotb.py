"""cocotb side of the simulated board (:mod:`kvoverlay.boards.sim`): the host's bytes in, the board's bytes out.

The job (JSON file named by ``KVO_BOARD_JOB``) names the port and nonce of the host's socket on 127.0.0.1. One JSON
line per command each way (:class:`kvoverlay.host.link.SimTransport` is the other end):

- ``xfer``: send ``send`` (hex) on the line, then wait until the board has sent something and gone quiet, or
  ``timeout_ns`` of simulated time has passed; reply with what it sent (``recv``, hex) and the simulated time;
- ``quit``.

The clock runs in HDL (the testbench); Python only loads a block of bytes and awaits an edge, so it never sees a
bit or a cycle.
"""

import json
import os
import socket

import cocotb
from cocotb.triggers import FallingEdge, First, RisingEdge, Timer
from cocotb.utils import get_sim_time

CHUNK = int(os.environ.get("KVO_BOARD_CHUNK", "4096"))


def _bytes_from(handle, count):
    value = int(handle.value)
    return value.to_bytes(CHUNK, "little")[:count]


async def _send(dut, data: bytes):
    for i in range(0, len(data), CHUNK):
        part = data[i:i + CHUNK]
        dut.host_tx_data.value = int.from_bytes(part, "little")
        dut.host_tx_len.value = len(part)
        await FallingEdge(dut.clk)
        dut.host_tx_go.value = 1
        await FallingEdge(dut.clk)
        dut.host_tx_go.value = 0
        if int(dut.host_tx_busy.value):
            await FallingEdge(dut.host_tx_busy)


async def _xfer(dut, cmd) -> dict:
    start = int(dut.host_rx_count.value)
    await _send(dut, bytes.fromhex(cmd["send"]))
    if int(dut.host_rx_count.value) == start or int(dut.host_rx_idle.value) == 0:
        await First(RisingEdge(dut.host_rx_idle), Timer(int(cmd["timeout_ns"]), unit="ns"))
    end = int(dut.host_rx_count.value)
    n = min(end - start, CHUNK)
    ring = _bytes_from(dut.host_rx_data, CHUNK)
    got = bytes(ring[k % CHUNK] for k in range(end - n, end)) if n else b""
    # bytes that did not fit the testbench's ring are lost, as on a serial port whose buffer overflows
    return {"recv": got.hex(), "lost": end - start - n, "framing": int(dut.host_rx_framing.value),
            "time_ns": get_sim_time(unit="ns"), "sdram_error": int(dut.sdram_error.value)}


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@cocotb.test()
async def board_serve(dut):
    job = _load(os.environ["KVO_BOARD_JOB"])
    dut.rst.value = 1
    dut.host_tx_go.value = 0
    dut.host_tx_len.value = 0
    for _ in range(4):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    sock = socket.create_connection(("127.0.0.1", job["port"]))
    stream = sock.makefile("rwb")
    stream.write(json.dumps({"hello": job["nonce"], "pid": os.getpid()}).encode() + b"\n")
    stream.flush()
    while True:
        line = stream.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            stream.write(b"{}\n")
            stream.flush()
            break
        reply = await _xfer(dut, cmd)
        stream.write(json.dumps(reply).encode() + b"\n")
        stream.flush()
    stream.close()
    sock.close()
