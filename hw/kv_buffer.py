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

from amaranth.hdl import Module, Shape, unsigned
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
    low bits) in each of the K and V memories, and its exponents ``ek`` and ``ev`` at the same index in the two
    exponent memories. Lanes beyond the head dimension of a write are masked, so they keep their old contents (as the golden
    model's KVAPPEND leaves them).

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``kv_capacity``, ``max_head_dim`` and ``kv_columns``.
    host_read : bool
        Whether to build the host's read port. Each read port of a block RAM memory is a copy of it (an ECP5
        DP16KD has one write and one read port), so a port that nothing reads doubles the K and V memories: the
        overlay reads the pool only through the engine, the attention engine's testbench also through the host.

    Attributes
    ----------
    port : In(kv_port_signature(config))
        The attention engine's write and read port.
    host : In(kv_host_read_signature(config))
        Read port for the host; with ``host_read`` only.
    """

    def __init__(self, config, *, host_read: bool = False):
        if not isinstance(host_read, bool):
            raise TypeError(f"host_read must be a bool, got {host_read!r}")
        self.config = config
        self.host_read = host_read
        self.geometry = kv_geometry(config)
        members = {"port": In(kv_port_signature(config))}
        if host_read:
            members["host"] = In(kv_host_read_signature(config))
        super().__init__(members)

    def word_index(self, base, head, cols, pos):
        """First word of token *pos* of head *head* (columns from *base*, *cols* per head); ints or Amaranth values."""
        return (base + head * cols) * self.config.kv_capacity + pos * cols

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        lanes, words = g["lanes"], g["words"]
        m.submodules.k_mem = k_mem = Memory(shape=unsigned(16 * lanes), depth=words, init=[])
        m.submodules.v_mem = v_mem = Memory(shape=unsigned(16 * lanes), depth=words, init=[])
        # the exponents in two memories: the key's is read at the K position only, the value's at both (the score
        # pass tracks the tile's largest value exponent), so only the value's is copied for the second read port
        m.submodules.ek_mem = ek_mem = Memory(shape=EXP_SHAPE, depth=words, init=[numerics.EXP_MIN] * words)
        m.submodules.ev_mem = ev_mem = Memory(shape=EXP_SHAPE, depth=words, init=[numerics.EXP_MIN] * words)
        p = self.port

        wr_word = self.word_index(p.wr_base, p.wr_head, p.cols, p.wr_pos)
        for mem, en in ((k_mem, p.wr_k_en), (v_mem, p.wr_v_en)):
            w = mem.write_port(granularity=16)
            m.d.comb += [w.addr.eq(wr_word + p.wr_chunk), w.data.eq(p.wr_data),
                         w.en.eq(p.wr_mask & en.replicate(lanes))]
        for mem, data in ((ek_mem, p.wr_ek), (ev_mem, p.wr_ev)):
            w = mem.write_port()
            m.d.comb += [w.addr.eq(wr_word), w.data.eq(data), w.en.eq(p.wr_e_en)]

        def read(mem, addr, data):
            port = mem.read_port()
            m.d.comb += [port.addr.eq(addr), data.eq(port.data)]

        k_word = self.word_index(p.rd_base, p.rd_head, p.cols, p.rd_k_pos)
        v_word = self.word_index(p.rd_base, p.rd_head, p.cols, p.rd_v_pos)
        read(k_mem, k_word + p.rd_k_chunk, p.rd_k_data)
        read(v_mem, v_word + p.rd_v_chunk, p.rd_v_data)
        read(ek_mem, k_word, p.rd_ek)
        read(ev_mem, k_word, p.rd_k_ev)
        read(ev_mem, v_word, p.rd_ev)
        if self.host_read:
            h = self.host
            host_word = self.word_index(h.base, h.head, h.cols, h.pos)
            read(k_mem, host_word + h.chunk, h.k_data)
            read(v_mem, host_word + h.chunk, h.v_data)
            read(ek_mem, host_word, h.ek)
            read(ev_mem, host_word, h.ev)
        return m
