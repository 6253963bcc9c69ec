"""The host's side of the board link: transports (a serial port, the simulated board) and the bridge client.

Glasgow style: :class:`BridgeClient` speaks :mod:`kvoverlay.link` over any :class:`Transport`, so the same host
code drives a real board (:class:`SerialTransport`, pyserial) and its simulated twin (:class:`SimTransport`, the
board top in Verilator with a UART model on its pins). The client never takes a corrupted, stale or missing reply
as a result: it drops a reply whose CRC fails or whose sequence number is not its request's, sends the request
again with the same sequence number when no good reply comes in time, and raises :class:`LinkError` after
:attr:`BridgeClient.retries` attempts.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from kvoverlay import link

__all__ = ["BridgeClient", "LinkError", "SerialTransport", "SimTransport", "Transport", "open_transport"]


class LinkError(RuntimeError):
    """The board did not answer, or answered with an error, after every retry; or the port cannot be opened."""


class Transport(abc.ABC):
    """A byte pipe to a board's UART.

    Attributes
    ----------
    byte_s : float
        Seconds per byte on the line (10 bits at the baud rate); timeouts are counted in these.
    latency_s : float
        Seconds a reply may take to start besides its bytes (USB latency, the board's work).
    """

    byte_s: float = 1e-5
    latency_s: float = 0.05

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Send *data*."""

    @abc.abstractmethod
    def read(self, timeout_s: float) -> bytes:
        """The bytes that arrive until the line has been quiet a while after some did, or *timeout_s* passes."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialTransport(Transport):
    """A serial port (pyserial), e.g. the ULX3S's FTDI at ``/dev/ttyUSB0``.

    Parameters
    ----------
    port : str
    baud : int
        The bitstream's baud rate (``kvoverlay build --baud``).
    """

    def __init__(self, port: str, baud: int):
        try:
            import serial
        except ImportError:
            from kvoverlay.toolchain import install_command

            raise LinkError(f"--port {port} needs pyserial, which is not installed: {install_command('board')}") from None
        try:
            self.serial = serial.Serial(port, baud, timeout=0, exclusive=True)
        except (serial.SerialException, OSError) as exc:
            # pyserial nests the OS error's text in its own: keep the innermost part
            why = re.sub(r"^.*\[Errno \d+\] ", "", str(exc)).split(": '")[0] or type(exc).__name__
            raise LinkError(f"cannot open {port}: {why} (is the board connected, and the port not in use?)") from None
        self.byte_s = 10 / baud
        self.latency_s = 0.05

    def write(self, data: bytes) -> None:
        self.serial.write(data)
        self.serial.flush()

    def read(self, timeout_s: float) -> bytes:
        out = bytearray()
        deadline = time.monotonic() + timeout_s
        quiet = max(0.01, 30 * self.byte_s)
        last = None
        while time.monotonic() < deadline:
            chunk = self.serial.read(self.serial.in_waiting or 1)
            if chunk:
                out += chunk
                last = time.monotonic()
            elif last is not None and time.monotonic() - last > quiet:
                break
            else:
                time.sleep(min(quiet / 4, 0.002))
        return bytes(out)

    def close(self) -> None:
        self.serial.close()


class SimTransport(Transport):
    """The board top simulated in Verilator (:mod:`kvoverlay.boards.sim`), one simulator process per transport.

    Times are simulated: :attr:`byte_s` is the UART's byte period at the simulation's short bit period, and a read's
    timeout runs on the simulator's clock, so a test of lost bytes waits microseconds of simulated time.

    Parameters
    ----------
    config : OverlayConfig
    mem_bytes : int
        The board memory of the simulated bitstream.
    divisor : int, optional
        UART clock cycles per bit.
    overlay : bool
        Build the overlay in (False: the link alone, as ``kvoverlay build --link-only``).
    memory : str
        ``bram``, or ``sdram`` (the SDRAM controller and the checking SDRAM model: a timing violation it sees is a
        :class:`LinkError`).
    """

    CONNECT_TIMEOUT_S = 600

    def __init__(self, config, *, mem_bytes: int, divisor: int | None = None, overlay: bool = True,
                 memory: str = "bram"):
        from cocotb_tools.runner import get_runner
        from kvoverlay.boards import sim

        divisor = divisor or sim.DEFAULT_DIVISOR
        work = sim.build_board_model(config, mem_bytes=mem_bytes, divisor=divisor, overlay=overlay, memory=memory)
        self.byte_s = 10 * divisor * sim.CLOCK_NS * 1e-9
        self.latency_s = 4000 * sim.CLOCK_NS * 1e-9
        self.sim_time_ns = 0
        self.lost = 0
        self._pending = bytearray()
        self._tmp = Path(tempfile.mkdtemp(prefix="kvo-board-"))
        shutil.copy(Path(sim.__file__).with_name("sim_cocotb.py"), self._tmp / "sim_cocotb.py")
        listener = socket.create_server(("127.0.0.1", 0))
        nonce = secrets.token_hex(16)
        (self._tmp / "job.json").write_text(json.dumps({"port": listener.getsockname()[1], "nonce": nonce}))
        kwargs = {"hdl_toplevel": sim.TB_NAME, "hdl_toplevel_lang": "verilog", "test_module": "sim_cocotb",
                  "test_dir": self._tmp, "build_dir": work / "build",
                  "extra_env": {"KVO_BOARD_JOB": str(self._tmp / "job.json"), "KVO_BOARD_CHUNK": str(sim.CHUNK_BYTES)},
                  "results_xml": str(self._tmp / "results.xml"), "log_file": str(self._tmp / "sim.log")}
        runner = get_runner("verilator")

        def run():
            with contextlib.suppress(SystemExit, RuntimeError, OSError):
                runner.test(**kwargs)

        self._thread = threading.Thread(target=run, daemon=True, name="kvoverlay-board-sim")
        self._thread.start()
        self._sock = self._stream = None
        with listener:
            listener.settimeout(0.5)
            deadline = time.monotonic() + self.CONNECT_TIMEOUT_S
            while self._sock is None:
                try:
                    self._sock, _ = listener.accept()
                except TimeoutError:
                    if not self._thread.is_alive() or time.monotonic() > deadline:
                        self.close()
                        raise LinkError(f"the simulated board did not start: {self._log_tail()}") from None
        self._stream = self._sock.makefile("rwb")
        hello = json.loads(self._stream.readline() or b"{}")
        if hello.get("hello") != nonce:
            self.close()
            raise LinkError("an unexpected client connected to the simulated board's socket")

    def _log_tail(self) -> str:
        log = self._tmp / "sim.log"
        return " ".join(log.read_text(errors="replace")[-1500:].split()) if log.is_file() else ""

    def write(self, data: bytes) -> None:
        self._pending += data

    def read(self, timeout_s: float) -> bytes:
        if self._stream is None:
            raise LinkError("the simulated board is closed")
        send, self._pending = bytes(self._pending), bytearray()
        try:
            self._stream.write(json.dumps({"op": "xfer", "send": send.hex(),
                                           "timeout_ns": int(timeout_s * 1e9)}).encode() + b"\n")
            self._stream.flush()
            line = self._stream.readline()
        except OSError:
            line = b""
        if not line:
            raise LinkError(f"the simulated board exited: {self._log_tail()}")
        reply = json.loads(line)
        self.sim_time_ns = reply["time_ns"]
        if reply.get("sdram_error"):
            from kvoverlay.boards.sdram import SdramError

            raise LinkError(f"the simulated board's SDRAM model saw a timing violation: "
                            f"{SdramError(reply['sdram_error']).name}")
        self.lost += reply["lost"]
        return bytes.fromhex(reply["recv"])

    def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.write(b'{"op": "quit"}\n')
                self._stream.flush()
                self._stream.readline()
            self._stream.close()
            self._sock.close()
            self._stream = None
        self._thread.join(timeout=30)
        if not os.environ.get("KVOVERLAY_RTL_KEEP"):
            shutil.rmtree(self._tmp, ignore_errors=True)


def open_transport(port: str, config, *, baud: int, mem_bytes: int, memory: str = "bram") -> Transport:
    """``sim`` (the simulated board, *mem_bytes* of *memory*) or a serial port at *baud*."""
    if port == "sim":
        return SimTransport(config, mem_bytes=mem_bytes, memory=memory)
    return SerialTransport(port, baud)


class BridgeClient:
    """Requests to the board's bridge over a :class:`Transport`.

    Parameters
    ----------
    transport : Transport
    retries : int
        Attempts per request before :class:`LinkError`.

    Attributes
    ----------
    stats : collections.Counter
        ``requests``, ``retries`` and why: ``timeout`` (no reply), ``crc`` (a reply whose CRC or escapes failed),
        ``stale`` (a good reply to another sequence number).
    """

    #: largest data block of one WRITE_MEM or READ_MEM reply
    BLOCK_BYTES = 1024

    def __init__(self, transport: Transport, *, retries: int = 8):
        self.transport = transport
        self.retries = retries
        self.seq = secrets.randbelow(256)
        self.stats = Counter()
        self.port_bytes = None

    def request(self, cmd: link.Cmd, args: bytes = b"", reply_bytes: int = 0) -> bytes:
        """Send one request until a good reply comes; returns its payload (after the status)."""
        self.seq = (self.seq + 1) % 256
        body = bytes([self.seq, cmd]) + args
        wire = link.frame(body)
        self.stats["requests"] += 1
        timeout = self.transport.latency_s + self.transport.byte_s * (len(wire) + 2 * (reply_bytes + 4) + 64)
        why = []
        for attempt in range(self.retries):
            if attempt:
                self.stats["retries"] += 1
            self.transport.write(wire)
            reply = self._take(self.transport.read(timeout), why)
            if reply is not None:
                status, payload = reply[0], reply[1:]
                if status == link.Status.BUSY:
                    raise LinkError(f"{cmd.name}: the overlay is running")
                if status != link.Status.OK:
                    raise LinkError(f"{cmd.name}: the bridge refused the request ({link.Status(status).name})")
                return payload
            timeout *= 2  # a slow reply is not a lost one: wait longer each time
        raise LinkError(f"{cmd.name}: no valid reply from the board after {self.retries} attempts "
                        f"({', '.join(why) or 'nothing received'})")

    def _take(self, raw: bytes, why: list):
        """The first good reply to the current request in *raw* (status and payload), or None."""
        if not raw:
            self.stats["timeout"] += 1
            why.append("timeout")
        for chunk in raw.split(bytes([link.END])):
            if not chunk:
                continue
            body = link.slip_decode(chunk)
            if body is None or len(body) < 4 or link.crc16(body) != 0:
                self.stats["crc"] += 1
                why.append("corrupted reply")
                continue
            if body[0] != self.seq:
                self.stats["stale"] += 1
                why.append("stale reply")
                continue
            return body[1:-2]
        if raw and (not why or why[-1] == "timeout"):
            why.append("no complete reply")
        return None

    # ------------------------------------------------------------ commands
    def info(self) -> dict:
        import struct

        p = self.request(link.Cmd.INFO, reply_bytes=14)
        if len(p) != 14:
            raise LinkError(f"INFO: a reply of {len(p)} bytes, expected 14 (another bridge version?)")
        version, flags, port_bits, words, fingerprint, dropped = struct.unpack("<BBHIIH", p)
        self.port_bytes = port_bits // 8
        return {"version": version, "overlay": bool(flags & 1), "sdram": bool(flags & 2), "port_bits": port_bits, "mem_words": words,
                "mem_bytes": words * port_bits // 8, "fingerprint": fingerprint, "dropped_frames": dropped}

    def write_mem(self, first_word: int, data: bytes, progress=None) -> None:
        pb = self.port_bytes
        data = bytes(data) + bytes(-len(data) % pb)
        step = self.BLOCK_BYTES // pb * pb
        for off in range(0, len(data), step):
            self.request(link.Cmd.WRITE_MEM, link.pack("I", first_word + off // pb) + data[off:off + step])
            if progress is not None:
                progress(min(step, len(data) - off))

    def read_mem(self, first_word: int, count: int) -> bytes:
        pb = self.port_bytes
        out = bytearray()
        per = max(1, self.BLOCK_BYTES // pb)
        for w in range(first_word, first_word + count, per):
            n = min(per, first_word + count - w)
            p = self.request(link.Cmd.READ_MEM, link.pack("IH", w, n), reply_bytes=n * pb)
            if len(p) != n * pb:
                raise LinkError(f"READ_MEM: {len(p)} bytes for {n} words")
            out += p
        return bytes(out)

    def write_reg(self, index: int, value: int) -> None:
        self.request(link.Cmd.WRITE_REG, link.pack("BI", index, value & 0xFFFFFFFF))

    def read(self, space: link.Space, first: int, count: int, size: int) -> list:
        """*count* values of *size* bytes from *space* (unsigned)."""
        out = []
        per = max(1, self.BLOCK_BYTES // size)
        for i in range(first, first + count, per):
            n = min(per, first + count - i)
            p = self.request(link.Cmd.READ, link.pack("BHH", space, i, n), reply_bytes=n * size)
            if len(p) != n * size:
                raise LinkError(f"READ: {len(p)} bytes for {n} values of {size}")
            out += [int.from_bytes(p[k * size:(k + 1) * size], "little") for k in range(n)]
        return out

    def start(self, prog_base: int, watchdog: int) -> None:
        self.request(link.Cmd.START, link.pack("II", prog_base, watchdog))

    def status(self) -> dict:
        import struct

        p = self.request(link.Cmd.STATUS, reply_bytes=11)
        flags, code, info, pc, runs = struct.unpack("<BBBII", p)
        return {"running": bool(flags & 1), "done": bool(flags & 2), "error": bool(flags & 4), "error_code": code,
                "error_info": info, "error_pc": pc, "runs": runs}

    def reset(self) -> None:
        self.request(link.Cmd.RESET)
