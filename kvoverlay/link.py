"""The host bridge protocol: framing, commands and checksums, declared once for the board's bridge and the host.

The board top's UART bridge (:mod:`kvoverlay.boards.bridge`) and the host's client (:mod:`kvoverlay.host.link`)
both take every constant from here.

A frame is SLIP-framed on the wire (RFC 1055: :data:`END` delimits, :data:`ESC` escapes), so a dropped, added or
corrupted byte costs at most the frame it falls in and the receiver finds the next frame by itself. Inside the
framing a request is ``seq, command, arguments..., crc_hi, crc_lo`` and a reply ``seq, status, payload...,
crc_hi, crc_lo``; the CRC is CRC-16/CCITT-FALSE (polynomial 0x1021, initial value 0xFFFF) over everything before
it, so the CRC over a whole good frame is 0. The bridge drops a frame whose CRC fails (and counts it); the host
drops a reply whose CRC fails or whose ``seq`` is not its request's, and sends the request again, with the same
``seq``, when no good reply comes in time. The bridge remembers the ``seq`` of the last request it executed: a
repeated :data:`Cmd.START` (its reply was lost) is answered without starting the program a second time. Every
other command can run twice with the same effect.

Multi-byte fields are little-endian, except the CRC (most significant byte first, which gives the zero residue).
"""

from __future__ import annotations

import enum
import struct
import zlib

__all__ = ["END", "ESC", "ESC_END", "ESC_ESC", "LINK_VERSION", "MAX_REQUEST", "Cmd", "Space", "Status",
           "config_fingerprint", "crc16", "frame", "pack", "slip_decode", "slip_encode",
           "space_bytes"]

#: Version of this protocol; INFO reports it and the host refuses a bridge of another version.
LINK_VERSION = 1
END, ESC, ESC_END, ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD
#: Bytes at the top of an SDRAM board memory that block RAM mirrors for the instruction fetch (INFO's flag bit 1):
#: the host places the program there.
SDRAM_INSN_WINDOW_BYTES = 16 * 1024

#: Largest request the bridge buffers, in bytes between the delimiters (unescaped): a WRITE_MEM of 1 KiB of data.
MAX_REQUEST = 1024 + 16


class Cmd(enum.IntEnum):
    """Request commands (arguments, then the reply's payload)."""

    #: (none) -> version u8, flags u8 (bit 0: an overlay is built in; bit 1: the memory is SDRAM), port_bits u16,
    #: memory words u32, config fingerprint u32, dropped frames u16
    INFO = 0x01
    #: first word u32, whole memory words -> (none); refused while the overlay runs
    WRITE_MEM = 0x02
    #: first word u32, count u16 -> the words; refused while the overlay runs
    READ_MEM = 0x03
    #: register u8, value u32 -> (none); refused while the overlay runs
    WRITE_REG = 0x04
    #: space u8, first index u16, count u16 -> the values (:func:`space_bytes` each, little-endian)
    READ = 0x05
    #: program base (instruction index) u32, watchdog cycles u32 -> (none)
    START = 0x06
    #: (none) -> flags u8 (running, done, error), error code u8, error info u8, error pc u32, runs u32
    STATUS = 0x07
    #: (none) -> (none): reset the overlay (its KV buffer empties); the memory keeps its contents
    RESET = 0x08


class Status(enum.IntEnum):
    """The reply's status byte."""

    OK = 0
    #: the overlay runs: memory and registers wait until it is done
    BUSY = 1
    #: unknown command, wrong length or an index outside the space
    BAD_REQUEST = 2


class Space(enum.IntEnum):
    """What :data:`Cmd.READ` reads; :func:`space_bytes` gives each value's size for a configuration."""

    REGS = 0
    EREGS = 1
    COUNTERS = 2
    ABUF = 3
    ACC = 4


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE of *data* (continuing from *crc*)."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def frame(body: bytes) -> bytes:
    """*body* with its CRC appended, SLIP-escaped, between two END bytes (the first flushes line noise)."""
    crc = crc16(body)
    return bytes([END]) + slip_encode(body + bytes([crc >> 8, crc & 0xFF])) + bytes([END])


def slip_encode(data: bytes) -> bytes:
    return data.replace(bytes([ESC]), bytes([ESC, ESC_ESC])).replace(bytes([END]), bytes([ESC, ESC_END]))


def slip_decode(data: bytes) -> bytes | None:
    """The bytes of one frame's content, or None where an escape is malformed."""
    out, esc = bytearray(), False
    for byte in data:
        if esc:
            if byte not in (ESC_END, ESC_ESC):
                return None
            out.append(END if byte == ESC_END else ESC)
            esc = False
        elif byte == ESC:
            esc = True
        else:
            out.append(byte)
    return None if esc else bytes(out)


def config_fingerprint(config) -> int:
    """32-bit fingerprint of an :class:`~kvoverlay.config.OverlayConfig`: INFO reports the bitstream's, and the host
    refuses a program compiled for another configuration."""
    return zlib.crc32(config.to_toml().encode())


def space_bytes(config, space: Space) -> int:
    """Bytes per value of a READ *space* for *config*: registers 4, exponent registers 2 (sign-extended),
    counters and accumulators 8, an activation-buffer word 2 per int16 lane."""
    return {Space.REGS: 4, Space.EREGS: 2, Space.COUNTERS: 8, Space.ABUF: 4 * config.port_bytes,
            Space.ACC: 8}[Space(space)]


def pack(fmt: str, *values) -> bytes:
    return struct.pack("<" + fmt, *values)
