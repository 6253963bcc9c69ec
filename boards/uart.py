"""A UART (8 data bits, no parity, one stop bit, least significant bit first) as two small components.

amaranth-stdio on PyPI is a placeholder (version 0), so the board top carries its own. The bit period is a
parameter in clock cycles: a board derives it from its clock and the baud rate, a simulation uses a short one so
that a program image loads in seconds (the protocol above does not change).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["MIN_DIVISOR", "UartRx", "UartTx", "check_divisor", "divisor_for"]

#: Fewest clock cycles per bit: the receiver samples each bit in its middle, after a two-stage synchronizer.
MIN_DIVISOR = 4


def divisor_for(clock_hz: float, baud: int) -> int:
    """Clock cycles per bit for *baud* at *clock_hz*; refuses a rate the clock cannot make within 2 %."""
    if not isinstance(baud, int) or baud <= 0:
        raise ValueError(f"baud must be a positive integer, got {baud!r}")
    divisor = round(clock_hz / baud)
    if divisor < MIN_DIVISOR or abs(clock_hz / divisor - baud) > 0.02 * baud:
        raise ValueError(f"baud {baud} cannot be made from a {clock_hz / 1e6:g} MHz clock within 2 % "
                         f"(needs at least {MIN_DIVISOR} cycles per bit)")
    return divisor


def check_divisor(divisor):
    if not isinstance(divisor, int) or divisor < MIN_DIVISOR:
        raise ValueError(f"divisor must be an integer of at least {MIN_DIVISOR} cycles per bit, got {divisor!r}")


class UartRx(wiring.Component):
    """Receiver: each byte whose stop bit is high leaves on ``data`` for one cycle (a byte with a low stop bit is
    a framing error: dropped, and counted on ``errors``).

    Parameters
    ----------
    divisor : int
        Clock cycles per bit.

    Attributes
    ----------
    rx : In(1)
        The line (idle high); synchronized inside.
    data : Out(stream.Signature(8, always_ready=True))
    errors : Out(16)
        Framing errors since reset (saturating).
    """

    def __init__(self, divisor: int):
        check_divisor(divisor)
        self.divisor = divisor
        super().__init__({"rx": In(1, init=1), "data": Out(stream.Signature(8, always_ready=True)), "errors": Out(16)})

    def elaborate(self, platform):
        m = Module()
        line = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.rx, line, init=1)
        timer = Signal(range(self.divisor))
        bit = Signal(range(9))
        shreg = Signal(8)
        with m.If(timer != 0):
            m.d.sync += timer.eq(timer - 1)
        with m.FSM():
            with m.State("IDLE"), m.If(~line):
                m.d.sync += timer.eq(self.divisor // 2 - 1)
                m.next = "START"
            with m.State("START"), m.If(timer == 0):
                # the middle of the start bit: still low, or it was a glitch
                m.d.sync += [timer.eq(self.divisor - 1), bit.eq(0)]
                m.next = "DATA"
                with m.If(line):
                    m.next = "IDLE"
            with m.State("DATA"), m.If(timer == 0):
                m.d.sync += [timer.eq(self.divisor - 1), shreg.eq(Cat(shreg[1:], line)), bit.eq(bit + 1)]
                with m.If(bit == 7):
                    m.next = "STOP"
            with m.State("STOP"), m.If(timer == 0):
                with m.If(line):
                    m.d.comb += [self.data.valid.eq(1), self.data.payload.eq(shreg)]
                with m.Elif(self.errors != 0xFFFF):
                    m.d.sync += self.errors.eq(self.errors + 1)
                m.next = "IDLE"
        return m


class UartTx(wiring.Component):
    """Transmitter: takes a byte from ``data`` whenever idle and sends start bit, 8 data bits and stop bit.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit.

    Attributes
    ----------
    data : In(stream.Signature(8))
    tx : Out(1)
        The line (idle high).
    """

    def __init__(self, divisor: int):
        check_divisor(divisor)
        self.divisor = divisor
        super().__init__({"data": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        timer = Signal(range(self.divisor))
        left = Signal(range(11))
        shreg = Signal(10, init=0x3FF)  # stop bit, 8 data bits, start bit: shifted out from bit 0
        m.d.comb += self.tx.eq(shreg[0])
        with m.If(left == 0):
            m.d.comb += self.data.ready.eq(1)
            with m.If(self.data.valid):
                m.d.sync += [shreg.eq(Cat(0, self.data.payload, 1)), left.eq(10), timer.eq(self.divisor - 1)]
        with m.Elif(timer == 0):
            m.d.sync += [shreg.eq(Cat(shreg[1:], 1)), left.eq(left - 1), timer.eq(self.divisor - 1)]
        with m.Else():
            m.d.sync += timer.eq(timer - 1)
        return m
