"""KV buffer: on-chip K and V mantissas plus per-token exponents, a pool of words carved per model.

The pool has ``config.kv_columns`` columns (K and V alike), a column being ``kv_capacity`` words of
``vector_lanes`` mantissas. A KV head of dimension d takes ``c = ceil(d / vector_lanes)`` columns; the compiler
gives each layer its first column (``kv_base``), so head h of a layer starts at column ``kv_base + h * c`` and its
token at position p takes the c words from ``(kv_base + h * c) * kv_capacity + p * c`` on, its exponents sitting
at the index of the first (as the golden model's ``kv_words`` lays them out). The attention engine and the host
address the buffer by coordinates (base, head, columns per head, position, chunk), never by raw memory address;
the layout is owned here.
"""

from __future__ import annotations

from amaranth.hdl import Module, Shape, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import numerics
from kvoverlay.config import KV_BASE_BITS

from .widths import address_bits, ceil_div

__all__ = ["EXP_SHAPE", "KvBuffer", "kv_geometry", "kv_host_read_signature", "kv_port_signature"]

#: Shape of one stored exponent: the bfp16 exponent range of :mod:`kvoverlay.numerics`.
EXP_SHAPE = Shape.cast(range(numerics.EXP_MIN, numerics.EXP_MAX + 1))


def kv_geometry(config) -> dict:
    """Derived sizes of the KV buffer for *config*.

    ``lanes`` mantissas per memory word (``config.vector_lanes``), ``row_chunks`` words of the widest token of
    one head (``ceil(max_head_dim / lanes)``), ``words`` words in the pool (``kv_columns * kv_capacity``).
    """
    lanes = config.vector_lanes
    row_chunks = ceil_div(config.max_head_dim, lanes)
    return {"lanes": lanes, "row_chunks": row_chunks, "words": config.kv_columns * config.kv_capacity}


def _coords(config) -> dict:
    g = kv_geometry(config)
    return {
        "base": unsigned(KV_BASE_BITS),
        "head": unsigned(8),
        "pos": unsigned(address_bits(config.kv_capacity)),
        "chunk": unsigned(address_bits(g["row_chunks"])),
    }


def _cols_shape(config):
    return unsigned(address_bits(kv_geometry(config)["row_chunks"] + 1))


def kv_port_signature(config) -> wiring.Signature:
    """The engine's port to the KV buffer (directions as seen by the engine).

    One write port (K or V mantissas of one chunk with a per-lane mask, and the token's two exponents) and one
    read port of latency 1 for one head of the layer at column ``base`` (``cols`` columns per head, shared by
    both: one instruction at a time), with its own position and chunk for K (``rd_k_data``, ``rd_ek``) and for
    V (``rd_v_data``, ``rd_ev``), so that the scores of one tile and the values of another stream at the same
    time.
    """
    g = kv_geometry(config)
    c = _coords(config)
    members = {f"wr_{name}": Out(shape) for name, shape in c.items()}
    members.update({"rd_base": Out(c["base"]), "rd_head": Out(c["head"]), "cols": Out(_cols_shape(config))})
    for side in ("k", "v"):
        members.update({f"rd_{side}_pos": Out(c["pos"]), f"rd_{side}_chunk": Out(c["chunk"])})
    members.update({
        "wr_data": Out(16 * g["lanes"]),
        "wr_mask": Out(g["lanes"]),
        "wr_k_en": Out(1),
        "wr_v_en": Out(1),
        "wr_ek": Out(EXP_SHAPE),
        "wr_ev": Out(EXP_SHAPE),
        "wr_e_en": Out(1),
        "rd_k_data": In(16 * g["lanes"]),
        "rd_v_data": In(16 * g["lanes"]),
        "rd_ek": In(EXP_SHAPE),
        "rd_ev": In(EXP_SHAPE),
        # the value exponent of the K-side position: the score pass tracks the tile's largest value exponent
        # while the value pass reads another tile
        "rd_k_ev": In(EXP_SHAPE),
    })
    return wiring.Signature(members)


def kv_host_read_signature(config) -> wiring.Signature:
    """A second read port, for the host (KV spill, offload, tests); latency 1."""
    g = kv_geometry(config)
    members = {name: Out(shape) for name, shape in _coords(config).items()}
    members.update({"cols": Out(_cols_shape(config)), "k_data": In(16 * g["lanes"]), "v_data": In(16 * g["lanes"]),
                    "ek": In(EXP_SHAPE), "ev": In(EXP_SHAPE)})
    return wiring.Signature(members)


class KvBuffer(wiring.Component):
    """K and V mantissas (int16) and per-token exponents: a pool of words that the compiler carves per model.

    Token p of head h of the layer at column ``base`` (``cols`` columns per head) starts at word
    ``(base + h * cols) * kv_capacity + p * cols``: ``cols`` words of ``vector_lanes`` mantissas (lane 0 in the
    low bits) in each of the K and V memories, and the word ``{ev, ek}`` at the same index in the exponent
    memory. Lanes beyond the head dimension of a write are masked, so they keep their old contents (as the golden
    model's KVAPPEND leaves them).

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``kv_capacity``, ``max_head_dim`` and ``kv_columns``.

    Attributes
    ----------
    port : In(kv_port_signature(config))
        The attention engine's write and read port.
    host : In(kv_host_read_signature(config))
        Read port for the host.
    """

    def __init__(self, config):
        self.config = config
        self.geometry = kv_geometry(config)
        super().__init__({"port": In(kv_port_signature(config)), "host": In(kv_host_read_signature(config))})

    def word_index(self, base, head, cols, pos):
        """First word of token *pos* of head *head* (columns from *base*, *cols* per head); ints or Amaranth values."""
        return (base + head * cols) * self.config.kv_capacity + pos * cols

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        lanes, words = g["lanes"], g["words"]
        ew = EXP_SHAPE.width
        m.submodules.k_mem = k_mem = Memory(shape=unsigned(16 * lanes), depth=words, init=[])
        m.submodules.v_mem = v_mem = Memory(shape=unsigned(16 * lanes), depth=words, init=[])
        m.submodules.exp_mem = exp_mem = Memory(shape=unsigned(2 * ew), depth=words,
                                                init=[(numerics.EXP_MIN & ((1 << ew) - 1)) * ((1 << ew) + 1)] * words)
        p, h = self.port, self.host

        wr_word = self.word_index(p.wr_base, p.wr_head, p.cols, p.wr_pos)
        for mem, en in ((k_mem, p.wr_k_en), (v_mem, p.wr_v_en)):
            w = mem.write_port(granularity=16)
            m.d.comb += [w.addr.eq(wr_word + p.wr_chunk), w.data.eq(p.wr_data),
                         w.en.eq(p.wr_mask & en.replicate(lanes))]
        ew_port = exp_mem.write_port()
        m.d.comb += [ew_port.addr.eq(wr_word), ew_port.data.eq(p.wr_ev.as_unsigned() << ew | p.wr_ek.as_unsigned()),
                     ew_port.en.eq(p.wr_e_en)]

        def read(mem, word, chunk, data):
            port = mem.read_port()
            m.d.comb += [port.addr.eq(word + chunk), data.eq(port.data)]

        def read_exp(word, ek, ev):
            port = exp_mem.read_port()
            m.d.comb += [port.addr.eq(word), ek.eq(port.data[:ew].as_signed()), ev.eq(port.data[ew:].as_signed())]

        k_word = self.word_index(p.rd_base, p.rd_head, p.cols, p.rd_k_pos)
        v_word = self.word_index(p.rd_base, p.rd_head, p.cols, p.rd_v_pos)
        read(k_mem, k_word, p.rd_k_chunk, p.rd_k_data)
        read(v_mem, v_word, p.rd_v_chunk, p.rd_v_data)
        read_exp(k_word, p.rd_ek, p.rd_k_ev)
        read_exp(v_word, Signal(EXP_SHAPE), p.rd_ev)
        host_word = self.word_index(h.base, h.head, h.cols, h.pos)
        read(k_mem, host_word, h.chunk, h.k_data)
        read(v_mem, host_word, h.chunk, h.v_data)
        read_exp(host_word, h.ek, h.ev)
        return m
