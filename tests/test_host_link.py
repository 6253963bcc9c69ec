"""The host link against the simulated board (the board top in Verilator, a UART model on its pins), with dropped,
duplicated and corrupted bytes injected between the host and the line: each is detected, and retried or reported,
never taken as a result. The link-only board (bridge and block RAM) keeps the Verilator build small."""

import random

import pytest

pytest.importorskip("cocotb_tools")

from kvoverlay.host.link import BridgeClient, LinkError, SerialTransport, SimTransport, Transport

from kvoverlay import link
from kvoverlay.config import PRESETS

CFG = PRESETS["tiny"]
MEM_BYTES = 4096


class FaultyLine(Transport):
    """A transport that damages the bytes of chosen calls: ``plan`` maps (direction, call index) to a fault."""

    def __init__(self, inner, plan):
        self.inner, self.plan = inner, dict(plan)
        self.byte_s, self.latency_s = inner.byte_s, inner.latency_s
        self.calls = {"out": 0, "in": 0}
        self.last_reply = b""
        self.applied = []

    def _damage(self, direction, data):
        fault = self.plan.get((direction, self.calls[direction]))
        self.calls[direction] += 1
        if fault is None or not data:
            return data
        self.applied.append((direction, fault))
        mid = len(data) // 2
        if fault == "drop":
            return data[:mid] + data[mid + 1:]
        if fault == "duplicate":
            return data[:mid] + data[mid:mid + 1] + data[mid:]
        if fault == "corrupt":
            return data[:mid] + bytes([data[mid] ^ 0x04]) + data[mid + 1:]
        if fault == "lose":
            return b""
        if fault == "stale":  # the previous good reply arrives (again) first
            return self.last_reply + data
        raise AssertionError(fault)

    def write(self, data):
        self.inner.write(self._damage("out", data))

    def read(self, timeout_s):
        raw = self.inner.read(timeout_s)
        damaged = self._damage("in", raw)
        if raw:
            self.last_reply = raw
        return damaged


@pytest.fixture(scope="module")
def board():
    with SimTransport(CFG, mem_bytes=MEM_BYTES, overlay=False) as t:
        yield t


def test_clean_link_round_trip(board):
    client = BridgeClient(board)
    info = client.info()
    assert info == {"version": link.LINK_VERSION, "overlay": False, "port_bits": CFG.port_bits,
                    "mem_words": MEM_BYTES // CFG.port_bytes, "mem_bytes": MEM_BYTES, "fingerprint": 0,
                    "sdram": False, "dropped_frames": info["dropped_frames"]}
    data = random.Random(3).randbytes(40 * CFG.port_bytes)
    client.write_mem(10, data)
    assert client.read_mem(10, 40) == data
    assert client.stats["retries"] == 0


@pytest.mark.parametrize("direction", ["out", "in"])
@pytest.mark.parametrize("fault", ["drop", "duplicate", "corrupt", "lose"])
def test_damaged_bytes_are_retried(board, direction, fault):
    client = BridgeClient(board)
    client.info()
    pb = CFG.port_bytes
    rng = random.Random(hash((direction, fault)) & 0xFFFF)
    data = rng.randbytes(16 * pb)
    line = FaultyLine(board, {(direction, 0): fault, (direction, 2): fault})
    client.transport = line
    client.write_mem(100, data)  # calls 0 (damaged) and 1 (the retry)
    assert client.read_mem(100, 16) == data  # calls 2 (damaged) and 3
    assert len(line.applied) == 2
    assert client.stats["retries"] == 2
    # the bridge counts what it dropped; the client why it retried
    assert client.stats["timeout"] + client.stats["crc"] >= 2


def test_stale_reply_skipped(board):
    client = BridgeClient(board)
    client.info()
    client.write_mem(0, bytes(range(8)) * 2)
    line = FaultyLine(board, {("in", 1): "stale"})
    client.transport = line
    first = client.read_mem(0, 1)
    second = client.read_mem(1, 1)  # the reply to the first read arrives again before this one's
    assert (first, second) == (bytes(range(8)), bytes(range(8)))
    assert client.stats["stale"] == 1 and client.stats["retries"] == 0


def test_start_retried_after_lost_reply_runs_once(board):
    client = BridgeClient(board)
    runs = client.status()["runs"]
    client.transport = FaultyLine(board, {("in", 0): "lose"})
    client.start(0, 0)  # the first START executes, its reply is lost; the retry must not start again
    client.transport = board
    assert client.status()["runs"] == runs + 1
    assert client.stats["retries"] == 1


def test_dead_line_reported():
    class Dead(Transport):
        byte_s, latency_s = 1e-6, 1e-6

        def write(self, data):
            pass

        def read(self, timeout_s):
            return b"\xc0\x01\x02\xc0"  # garbage that never checks

    client = BridgeClient(Dead(), retries=3)
    with pytest.raises(LinkError, match=r"INFO: no valid reply from the board after 3 attempts \(corrupted reply"):
        client.info()
    assert client.stats["crc"] == 3


def test_absent_serial_port_one_line():
    pytest.importorskip("serial")
    with pytest.raises(LinkError, match=r"^cannot open /dev/kvo-no-such-port: .*\(is the board connected"):
        SerialTransport("/dev/kvo-no-such-port", 1_000_000)
