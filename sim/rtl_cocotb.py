"""cocotb side of :mod:`kvoverlay.sim.rtl`: the Verilated overlay, driven at transaction level.

The job (JSON file named by ``KVO_RTL_JOB``) gives the program's base, the watchdog and either one run (register
arguments, what to read back) or a ``serve`` entry: the port and nonce of the host's socket on 127.0.0.1. The
clock and the memory model run in HDL; Python only writes registers, pulses ``start``, awaits ``done`` and reads
results. The memory image comes in through the memory model's ``$readmemh`` and a single run's memory goes out
through ``$writememh`` (plusargs set by the runner).

Served, the test is a command loop that lives as long as the host's session: one JSON object per line in, one
per line out (:class:`kvoverlay.sim.rtl.RtlProcess` is the other end). The simulator stands still while Python
waits for the next command, so the overlay's state (the KV buffer above all) persists from one command to the
next. Commands:

- ``steps``: from instruction ``entry`` of the loaded stream (0: its first), per step write the token and position registers (and any others), start, await ``done``, read
  the counters, the next-token register and the logits record (through the memory model's host read port).
  The token is the next of ``feed``, then for ``generate`` more steps the register just read (greedy
  generation, fed back without leaving the simulator);
- ``read_words`` / ``registers`` / ``state``: memory words, the scalar and exponent registers, the buffers;
- ``reset``: pulse ``rst`` (the next step starts a sequence at position 0);
- ``quit``: end the test, and with it the process.
"""

import json
import os
import socket
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


async def _write_regs(dut, values: dict, start: bool = True):
    """Host register writes, then (with *start*) a one-cycle ``start``.

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
    if start:
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


async def _steps(dut, job, cmd) -> dict:
    """Runs of the program, one per step, the next token fed back in the simulator after the *feed* tokens."""
    regs = cmd["registers"]
    feed = list(cmd["feed"])
    # the steps run the program at instruction *entry* of the loaded stream (a second program loaded behind
    # the first, such as the KV-writing one of kvoverlay bench decode); fetch adds prog_base to the pc, so it
    # must hold still while the overlay runs: it is set here, before the start pulse
    dut.prog_base.value = job["prog_base"] + int(cmd.get("entry", 0))
    out = []
    token = None
    for k in range(len(feed) + cmd["generate"]):
        token = feed[k] if k < len(feed) else token
        values = {**cmd.get("extra", {}), regs["token"]: token, regs["position"]: cmd["position"] + k}
        await _write_regs(dut, values)
        t0, c0 = time.perf_counter(), time.process_time()
        await with_timeout(RisingEdge(dut.done), job["max_cycles"] * CLOCK_NS, "ns")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        step = {"token": token, "wall_s": wall, "cpu_s": cpu, **await _status(dut, job)}
        out.append(step)
        if step["error"]:
            break
        step["next_token"] = await _comb(dut, "dbg_reg_data", "dbg_reg_addr", regs["next_token"])
        step["logits"] = [await _comb(dut, "dram_host_data", "dram_host_addr", cmd["logits_word"] + i)
                          for i in range(cmd["logits_words"])]
        token = step["next_token"]
    return {"steps": out}


async def _reset(dut):
    await FallingEdge(dut.clk)
    dut.rst.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


async def _serve(dut, job):
    """The command loop: one JSON line in, one out, until ``quit`` or the host closes the socket."""
    sock = socket.create_connection(("127.0.0.1", job["serve"]["port"]))
    stream = sock.makefile("rwb")

    def send(obj):
        stream.write(json.dumps(obj).encode() + b"\n")
        stream.flush()

    send({"hello": job["serve"]["nonce"], "pid": os.getpid()})
    runs = 0  # program runs since the process started: a replay would show here
    while True:
        line = stream.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            reply = await _command(dut, job, cmd)
        except (TimeoutError, ValueError, KeyError, TypeError, OSError) as exc:
            # a timeout, a bad command: say so, then end the process (the overlay's state is unknown)
            send({"fault": f"{type(exc).__name__}: {exc}", "runs": runs})
            break
        if op == "quit":
            send({"runs": runs})
            break
        runs += len(reply.get("steps", ()))
        send({**reply, "runs": runs})
    stream.close()
    sock.close()


async def _command(dut, job, cmd) -> dict:
    op = cmd["op"]
    if op == "steps":
        return await _steps(dut, job, cmd)
    if op == "read_words":
        return {"words": [await _comb(dut, "dram_host_data", "dram_host_addr", cmd["first"] + i)
                          for i in range(cmd["count"])]}
    if op == "registers":
        return await _registers(dut, job)
    if op == "state":
        return await _state(dut, job, cmd["abuf_words"], cmd["acc_words"])
    if op == "reset":
        await _reset(dut)
        return {}
    if op == "quit":
        return {}
    raise ValueError(f"unknown command {op!r}")


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
    if "serve" in job:
        await _serve(dut, job)
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
    result.update(await _state(dut, job, job["abuf_words"], job["acc_words"]))
    await RisingEdge(dut.clk)
    dut.dram_dump.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    _save(job["result"], result)
