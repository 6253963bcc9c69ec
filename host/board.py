"""The ``board`` backend: a program on the overlay of a board (or of its simulated twin) through the UART bridge.

``kvoverlay run PROGRAM.kvo --backend board --port /dev/ttyUSB0`` drives a board flashed with ``kvoverlay build
--program``; ``--port sim`` drives the same board top in Verilator (:class:`~kvoverlay.host.link.SimTransport`).
The backend checks that the bitstream was built for the program's configuration (INFO's fingerprint), loads the
memory image and the program into the board's memory (block RAM, or SDRAM for a program larger than it) once, then
runs each decode step as the RTL backend does: registers in, start, wait for done, then the hardware counters, the
next-token register and the logits record read back. The KV buffer stays on the board between steps.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from kvoverlay import bundle as kvbundle
from kvoverlay import isa, link
from kvoverlay import numerics as nx
from kvoverlay.bundle import read_logits

from .backend import SessionError, Step, outside_kv_buffer, register_args
from .link import BridgeClient, LinkError, open_transport

__all__ = ["DEFAULT_BAUD", "DEFAULT_BRAM_BYTES", "BoardBackend", "board_mem_bytes", "board_memory"]

#: The UART rate ``kvoverlay build`` gives a bitstream unless told otherwise (the ULX3S's FT231X goes to 3 Mbaud).
DEFAULT_BAUD = 1_000_000
#: Block RAM ``kvoverlay build`` gives a bitstream unless told otherwise (``--mem-bytes``).
DEFAULT_BRAM_BYTES = 1 << 17
#: Cycles without progress before the overlay's watchdog stops a run (as the RTL backend's).
WATCHDOG_CYCLES = 4096


def board_mem_bytes(program: kvbundle.Bundle) -> int:
    """The smallest block RAM (a power of two) that holds *program*'s memory image, outputs and instructions."""
    from kvoverlay.sim.rtl import _try_decode, _write_extent

    blob = isa.encode_program(program.instructions)
    instrs = [_try_decode(blob[i:i + isa.INSN_BYTES]) for i in range(0, len(blob), isa.INSN_BYTES)]
    align = max(program.config.port_bytes, isa.INSN_BYTES)
    need = -(-max(len(program.image), _write_extent(instrs)) // align) * align + len(blob)
    return max(1 << (need - 1).bit_length(), 2 * align)


def board_memory(program: kvbundle.Bundle, bram_bytes: int = DEFAULT_BRAM_BYTES) -> str:
    """``bram`` where *program* fits *bram_bytes* of block RAM (the full port rate), else ``sdram``."""
    return "bram" if board_mem_bytes(program) <= bram_bytes else "sdram"


class BoardBackend:
    """A board's overlay (``--backend board``), over a serial port or the simulated board (``port="sim"``).

    Parameters
    ----------
    program : Bundle
    port : str
        ``sim`` or a serial device.
    baud : int
        The bitstream's UART rate (serial ports only).
    memory : str, optional
        ``port="sim"``: the simulated board's memory, ``bram`` or ``sdram`` (default: :func:`board_memory`, block
        RAM where the program fits *bram_bytes*). A real board's is the bitstream's (INFO says which).
    bram_bytes : int
        The block RAM a ``bram`` board has (``kvoverlay build --mem-bytes``).
    """

    name = "board"

    def __init__(self, program: kvbundle.Bundle, *, port: str | None = None, baud: int = DEFAULT_BAUD,
                 memory: str | None = None, bram_bytes: int = DEFAULT_BRAM_BYTES, **options):
        from kvoverlay.hw.overlay import COUNTERS

        if not port:
            raise SessionError("--backend board needs --port: a serial device such as /dev/ttyUSB0, or sim")
        outside = sorted({ins.fields["layer"] for ins in outside_kv_buffer(program).values()})
        if outside:
            raise SessionError(f"--backend board: the KV of layers {outside} does not fit the overlay's KV buffer")
        self.program = program
        self.options = options
        self.counters_names = COUNTERS
        cfg = program.config
        self.blob = isa.encode_program(program.instructions)
        mem_bytes = board_mem_bytes(program)
        if memory not in (None, "bram", "sdram"):
            raise SessionError(f"--backend board: memory must be bram or sdram, got {memory!r}")
        self.memory = memory or board_memory(program, bram_bytes)
        try:
            self.transport = open_transport(port, cfg, baud=baud, mem_bytes=mem_bytes, memory=self.memory)
        except LinkError as exc:
            raise SessionError(str(exc)) from None
        self.client = BridgeClient(self.transport)
        info = self.client.info()
        if info["version"] != link.LINK_VERSION or not info["overlay"]:
            raise SessionError(f"--port {port}: the board runs bridge version {info['version']}"
                               f"{'' if info['overlay'] else ' without an overlay (a link-only bitstream)'}; "
                               f"flash one built by kvoverlay build --config {cfg.name}")
        if info["fingerprint"] != link.config_fingerprint(cfg):
            raise SessionError(f"--port {port}: the bitstream was built for another configuration than the program's "
                               f"({cfg.name}); rebuild with kvoverlay build --config <the program's config>")
        if info["mem_bytes"] < mem_bytes:
            raise SessionError(f"--port {port}: the program needs {mem_bytes} bytes of board memory, the bitstream "
                               f"has {info['mem_bytes']}")
        align = max(cfg.port_bytes, isa.INSN_BYTES)
        self.memory = "sdram" if info["sdram"] else "bram"
        if info["sdram"] and len(self.blob) + align > link.SDRAM_INSN_WINDOW_BYTES:
            raise SessionError(f"--port {port}: the program's {len(self.blob)} instruction bytes exceed the SDRAM "
                               f"board's {link.SDRAM_INSN_WINDOW_BYTES}-byte instruction window")
        self.prog_at = (info["mem_bytes"] - len(self.blob)) // align * align
        self.load_s = self._load()
        self.steps = 0

    def _load(self) -> float:
        """Write the memory image and the program into the board's memory; returns the seconds it took."""
        pb = self.program.config.port_bytes
        t0 = time.perf_counter()
        total = len(self.program.image) + len(self.blob)
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading the program into the board", leave=False)
        else:
            print(f"loading {total} bytes into the board's memory ...", file=sys.stderr, flush=True)
        progress = bar.update if bar is not None else None
        self.client.write_mem(0, self.program.image, progress)
        self.client.write_mem(self.prog_at // pb, self.blob, progress)
        if bar is not None:
            bar.close()
        return time.perf_counter() - t0

    def _run(self, values: dict):
        from kvoverlay.sim.rtl import _counters, _error

        for i, v in values.items():
            self.client.write_reg(i, v)
        self.client.start(self.prog_at // isa.INSN_BYTES, WATCHDOG_CYCLES)
        while True:
            st = self.client.status()
            if st["done"] and not st["running"]:
                break
        if st["error"]:
            raise _error(st, self.program.instructions, WATCHDOG_CYCLES, step=self.steps)
        hw = dict(zip(self.counters_names, self.client.read(link.Space.COUNTERS, 0, len(self.counters_names), 8)))
        self.steps += 1
        return _counters(hw)

    def step(self, token: int, position: int, registers: dict | None = None) -> Step:
        counters = self._run(register_args(self.program, token, position, registers))
        regs = self.program.manifest["registers"]
        logits = read_logits(self.program.manifest["logits"], self.read_vector)
        return Step(self.read_register(int(regs["next_token"])), logits, counters)

    def reset(self) -> None:
        self.client.reset()
        self.steps = 0

    def close(self) -> None:
        self.transport.close()

    def read_vector(self, addr: int, length: int) -> tuple:
        from kvoverlay.sim.rtl import _record_from_words, _record_words

        pb = self.program.config.port_bytes
        first, count = _record_words(addr, length, pb)
        raw = self.client.read_mem(first, count)
        return _record_from_words([int.from_bytes(raw[i:i + pb], "little") for i in range(0, len(raw), pb)],
                                  addr, length, pb)

    def write_vector(self, addr: int, mantissas, exponent: int) -> None:
        pb = self.program.config.port_bytes
        record = nx.pack_vector_record(np.asarray(mantissas, np.int64), int(exponent))
        first, end = addr // pb, -(-(addr + len(record)) // pb)
        raw = bytearray(self.client.read_mem(first, end - first))
        raw[addr % pb: addr % pb + len(record)] = record
        self.client.write_mem(first, bytes(raw))

    def read_register(self, index: int) -> int:
        (value,) = self.client.read(link.Space.REGS, index, 1, 4)
        return value - (1 << 32) if value >> 31 else value
