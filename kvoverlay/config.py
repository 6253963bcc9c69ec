"""OverlayConfig: every hardware parameter of the overlay, declared once.

The compiler, the golden model, the Amaranth hardware and the board flow all
take the same frozen :class:`OverlayConfig`; none of them restates a parameter.
Presets are named here, and a config round-trips through TOML.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["KV_BASE_BITS", "PRESETS", "WEIGHT_CHOICES", "WEIGHT_FORMATS", "ConfigError", "OverlayConfig", "load_config"]

#: Weight formats the ISA can express, with their bit widths.
WEIGHT_FORMATS = {"int4": 4, "int8": 8, "w16": 16, "uint4": 4}
#: What ``kvoverlay compile --weights`` takes, and the format each name compiles to: int4's two flavours by what
#: they are (``int4-sym``: the int4 format; ``int4-asym``: uint4, a zero point per group), and plain ``int4`` as
#: the flavour that measured better on trained weights (docs/numerics.md, benchmarks/int4_formats.py).
WEIGHT_CHOICES = {"w16": "w16", "int8": "int8", "int4": "uint4", "int4-sym": "int4", "int4-asym": "uint4"}
#: Bits of KVAPPEND's and ATTN's ``kv_base`` (a column of the KV pool): the pool has at most 2**KV_BASE_BITS columns.
KV_BASE_BITS = 13
#: A weight group holds GROUP_BASE << lg_group weights (the ISA's group field): the smallest group there is.
GROUP_BASE = 8


class ConfigError(ValueError):
    """An unknown, missing or out-of-range configuration value."""


def _param(lo, hi, doc, *, pow2=False, multiple=None, default=None):
    # a default: a key added after bundles were first written, which a missing key takes; to_dict leaves it out at
    # that value, so that the bundles of configs that do not set it stay byte-identical
    meta = {"range": (lo, hi), "doc": doc, "pow2": pow2, "multiple": multiple, "omit_default": default is not None}
    return field(metadata=meta) if default is None else field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class OverlayConfig:
    """Hardware parameters of one overlay instance.

    Parameters
    ----------
    name : str
        Preset or user name; recorded in program bundles.
    port_bits : int
        Width of the external-memory port in bits (one beat per cycle). The
        GEMV engine consumes one port word of weights per cycle, so it also
        sets the MAC array: :attr:`macs_per_cycle`.
    vector_lanes : int
        Elements per cycle of the vector unit and of the attention engine.
    weight_formats : tuple of str
        Weight formats the GEMV engine is built with (subset of ``int4``,
        ``int8``, ``w16``, ``uint4``: int4 with a zero point per group).
    group_size : int
        Default number of weights that share one scale.
    min_group : int
        The smallest group the GEMV engine is built for (at most ``group_size``): it scales each group of a
        window (one port word of weights) apart only down to this size, one group multiplier per further group,
        so a config that never quantizes finer than its ``group_size`` builds the few it uses. GEMV faults
        (GROUP) on a narrower group and the compiler refuses one (:meth:`builds_group`). Default
        :data:`GROUP_BASE` (8, every group the ISA expresses), what bundles written before this key mean.
    norm_heads : bool
        Whether the vector unit is built with NORM over each head (``head_dim``: Qwen3's and Gemma 3's q/k norms;
        a 64-entry store of the heads' scalars, the peak and the shift to full scale). Without it such a NORM
        faults (SHAPE) and the compiler normalizes each head as a row of its own. Default on, what bundles
        written before this key mean.
    act_buffer_words : int
        On-chip activation buffer, in 16-bit mantissas.
    ldrow_row_bytes : int
        The longest row record LDROW takes (its row buffer, :attr:`ldrow_buffer_bytes`), a multiple of the port's
        bytes; a longer one faults OUT_OF_RANGE, and the compiler refuses a table of such rows. Default 0: as long
        as the activation buffer holds (w16 weights and a scale per smallest group), what bundles written before
        this key mean.
    acc_buffer_words : int
        On-chip accumulator buffer, in 64-bit words.
    req_lanes : int
        Accumulator words the REQ unit renormalizes per cycle (:attr:`acc_lanes`; the accumulator buffer's rows are
        that many words wide), a power of two. Default 0: ``vector_lanes``.
    kv_capacity : int
        KV buffer capacity in tokens, per layer and KV head.
    max_layers : int
        Layers of ``max_kv_heads`` heads of ``max_head_dim`` the KV buffer holds: with those,
        the size of the KV pool (:attr:`kv_columns`), which the compiler carves per model.
    max_kv_heads : int
        KV heads per layer of that sizing.
    max_head_dim : int
        Largest head dimension the attention engine accepts.
    max_q_heads : int
        Most query heads of one ATTN: the attention engine's output scratch holds
        :attr:`attn_out_words` = ``max_q_heads * max_head_dim`` elements (at most ``act_buffer_words``); an ATTN
        with more faults (SHAPE) and the compiler refuses it (:meth:`runs_attn`). Default 255 (every ``q_heads``
        the ISA expresses), what bundles written before this key mean.
    attn_tile : int
        KV positions per online-softmax tile of the attention engine.
    clock_mhz : float
        Target clock frequency.
    dram_bytes : int
        Size of the external memory the program image may use.
    """

    name: str = "custom"
    port_bits: int = _param(32, 16384, "external-memory port width in bits", pow2=True)
    vector_lanes: int = _param(1, 1024, "elements per cycle of the vector and attention units", pow2=True)
    weight_formats: tuple = ("int4", "int8", "w16", "uint4")
    act_format: str = "bfp16"
    group_size: int = _param(GROUP_BASE, 1024, "default weights per group scale", pow2=True)
    min_group: int = _param(GROUP_BASE, 1024, "smallest weights per group scale the GEMV engine is built for",
                            pow2=True, default=GROUP_BASE)
    norm_heads: bool = field(default=True, metadata={"omit_default": True})
    act_buffer_words: int = _param(256, 65536, "activation buffer size in 16-bit words", pow2=True)
    ldrow_row_bytes: int = _param(0, 1 << 20, "longest LDROW row record in bytes (0: as the activation buffer holds)",
                                  default=0)
    acc_buffer_words: int = _param(64, 65536, "accumulator buffer size in 64-bit words", pow2=True)
    req_lanes: int = _param(0, 1024, "accumulator words per cycle of the REQ unit (0: vector_lanes)", default=0)
    kv_capacity: int = _param(1, 65536, "KV capacity in tokens per layer and KV head")
    max_layers: int = _param(1, 64, "layers held in the KV buffer")
    max_kv_heads: int = _param(1, 256, "KV heads per layer")
    max_head_dim: int = _param(2, 1024, "largest head dimension", multiple=2)
    max_q_heads: int = _param(1, 255, "query heads per ATTN", default=255)
    attn_tile: int = _param(1, 1024, "KV positions per online-softmax tile", pow2=True)
    clock_mhz: float = _param(1.0, 2000.0, "target clock in MHz")
    dram_bytes: int = _param(1 << 16, 1 << 32, "external memory size in bytes", pow2=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if "range" in meta:
                lo, hi = meta["range"]
                kind = float if isinstance(lo, float) else int
                if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ConfigError(f"{f.name} must be an integer in [{lo}, {hi}], got {value!r}")
                if kind is float and not isinstance(value, (int, float)):
                    raise ConfigError(f"{f.name} must be a number in [{lo}, {hi}], got {value!r}")
                if not lo <= value <= hi:
                    raise ConfigError(f"{f.name}={value!r} is out of range: allowed [{lo}, {hi}] ({meta['doc']})")
                if meta["pow2"] and value & (value - 1):
                    raise ConfigError(f"{f.name}={value!r} must be a power of two in [{lo}, {hi}]")
                if meta["multiple"] and value % meta["multiple"]:
                    raise ConfigError(f"{f.name}={value!r} must be a multiple of {meta['multiple']}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        fmts = tuple(self.weight_formats)
        if not fmts or any(f not in WEIGHT_FORMATS for f in fmts) or len(set(fmts)) != len(fmts):
            raise ConfigError(f"weight_formats={list(fmts)!r}: allowed a non-empty subset of {sorted(WEIGHT_FORMATS)}")
        object.__setattr__(self, "weight_formats", fmts)
        if not isinstance(self.norm_heads, bool):
            raise ConfigError(f"norm_heads must be true or false, got {self.norm_heads!r}")
        if self.min_group > self.group_size:
            raise ConfigError(f"min_group={self.min_group} exceeds group_size={self.group_size}: the GEMV engine "
                              "would not be built for the default group")
        if self.ldrow_row_bytes % self.port_bytes:
            raise ConfigError(f"ldrow_row_bytes={self.ldrow_row_bytes} must be a multiple of the port's "
                              f"{self.port_bytes} bytes")
        if self.req_lanes & (self.req_lanes - 1) or self.acc_lanes > min(self.abuf_lanes, self.acc_buffer_words):
            raise ConfigError(f"req_lanes={self.req_lanes!r} must be 0 or a power of two of at most "
                              f"{min(self.abuf_lanes, self.acc_buffer_words)} (an activation-buffer word's lanes and "
                              "the accumulator buffer's words)")
        if self.act_format != "bfp16":
            raise ConfigError(f"act_format={self.act_format!r}: allowed ['bfp16']")
        kv_words = self.kv_buffer_words
        if kv_words > 1 << 26:
            raise ConfigError(f"KV buffer of {kv_words} words exceeds 2^26; lower kv_capacity, max_layers, max_kv_heads or max_head_dim")
        if self.kv_columns > 1 << KV_BASE_BITS:
            raise ConfigError(f"KV pool of {self.kv_columns} columns exceeds 2^{KV_BASE_BITS}; lower max_layers, "
                              "max_kv_heads or max_head_dim, or raise vector_lanes")

    # ---- derived quantities: computed here so that nobody recomputes them ----
    @property
    def port_bytes(self) -> int:
        """Bytes per beat of the memory port."""
        return self.port_bits // 8

    @property
    def acc_lanes(self) -> int:
        """64-bit words of one accumulator-buffer row: what the REQ unit renormalizes per cycle (``req_lanes``; where
        it is 0, ``vector_lanes`` within an activation-buffer word and the accumulator buffer)."""
        return self.req_lanes or min(self.vector_lanes, self.abuf_lanes, self.acc_buffer_words)

    @property
    def abuf_lanes(self) -> int:
        """int16 lanes of one activation-buffer word: what the GEMV engine reads per cycle at int4.
        Vectors start on a word boundary."""
        return 2 * self.port_bytes

    @property
    def ldrow_buffer_bytes(self) -> int:
        """Bytes of LDROW's row buffer: the longest row record LDROW takes (``ldrow_row_bytes``, or by default the
        longest row the activation buffer can take: w16 weights plus one scale per smallest group, in port words)."""
        if self.ldrow_row_bytes:
            return self.ldrow_row_bytes
        most = 2 * self.act_buffer_words + 2 * (self.act_buffer_words // GROUP_BASE)
        return -(-most // self.port_bytes) * self.port_bytes

    @property
    def kv_buffer_words(self) -> int:
        """16-bit words of K and V mantissas held on chip."""
        return 2 * self.max_layers * self.max_kv_heads * self.kv_capacity * self.max_head_dim

    @property
    def kv_columns(self) -> int:
        """The KV pool's size in columns (K and V alike): a column is ``kv_capacity`` words of ``vector_lanes``
        mantissas. A KV head of dimension d takes :meth:`kv_head_columns` (d) columns, its tokens' words
        adjacent; any mix of layers and heads whose columns add up to at most this fits."""
        return self.max_layers * self.max_kv_heads * self.kv_head_columns(self.max_head_dim)

    def kv_head_columns(self, head_dim: int) -> int:
        """Columns of the KV pool one KV head of *head_dim* takes: ``ceil(head_dim / vector_lanes)``."""
        return -(-head_dim // self.vector_lanes)

    @property
    def bandwidth_gbps(self) -> float:
        """Peak external-memory bandwidth in GB/s at the target clock."""
        return self.port_bytes * self.clock_mhz * 1e6 / 1e9

    @property
    def macs_per_cycle(self) -> int:
        """int8 multiply-accumulates per cycle of the GEMV engine: one port word of int8 weights (int4 packs
        twice as many weights into the word, w16 half as many)."""
        return self.port_bytes

    def holds_kv(self, kv_base: int, heads: int, head_dim: int) -> bool:
        """Whether the KV pool holds *heads* KV heads of *head_dim* from column *kv_base* on (the one KV-fit
        predicate: the compiler's layout, the golden model and the host's offload placement all ask it)."""
        return (heads >= 1 and 1 <= head_dim <= self.max_head_dim
                and kv_base + heads * self.kv_head_columns(head_dim) <= self.kv_columns)

    @property
    def attn_out_words(self) -> int:
        """Elements of the attention engine's output scratch: the most one ATTN writes (``q_heads * head_dim``)."""
        return min(self.act_buffer_words, self.max_q_heads * self.max_head_dim)

    def runs_attn(self, q_heads: int) -> bool:
        """Whether the attention engine's output scratch takes an ATTN of *q_heads* query heads: the one predicate
        behind the compiler's refusal, the golden model's fault and the RTL's SHAPE fault."""
        return 1 <= q_heads <= self.max_q_heads

    def builds_group(self, group: int) -> bool:
        """Whether the GEMV engine takes groups of *group* weights: the one predicate behind the compiler's refusal,
        the golden model's fault and the RTL's GROUP fault."""
        return group >= self.min_group

    def weights_per_cycle(self, fmt: str) -> int:
        """Weights of format *fmt* the GEMV engine consumes per cycle (one port word)."""
        return max(1, self.port_bits // WEIGHT_FORMATS[fmt])

    # ---- serialization ----
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_formats"] = list(self.weight_formats)
        for f in dataclasses.fields(self):
            if f.metadata.get("omit_default") and d[f.name] == f.default:
                del d[f.name]
        return d

    def to_toml(self) -> str:
        lines = []
        for key, value in self.to_dict().items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, list):
                lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
            else:
                lines.append(f"{key} = {value!r}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, data: dict, *, base: OverlayConfig | None = None) -> OverlayConfig:
        """Build a config from *data*, over the values of *base* if given."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a table of keys, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names and key != "mac_lanes":
                raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(names)}")
        values = base.to_dict() if base is not None else {}
        values.update(data)
        _drop_legacy_mac_lanes(values)
        if "weight_formats" in values:
            values["weight_formats"] = tuple(values["weight_formats"])
        if "clock_mhz" in values and isinstance(values["clock_mhz"], int) and not isinstance(values["clock_mhz"], bool):
            values["clock_mhz"] = float(values["clock_mhz"])
        return cls(**values)

    @classmethod
    def from_toml(cls, text: str) -> OverlayConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}") from None
        base = None
        if "preset" in data:
            base = preset(data.pop("preset"))
        return cls.from_dict(data, base=base)

    def replace(self, **changes) -> OverlayConfig:
        return self.from_dict(changes, base=self)


def _drop_legacy_mac_lanes(values: dict) -> None:
    """Configs and bundles written before the GEMV engine's width followed the port carry a ``mac_lanes`` key;
    it is accepted where it states what the port gives (every preset did) and refused otherwise."""
    if "mac_lanes" not in values:
        return
    lanes = values.pop("mac_lanes")
    port_bits = values.get("port_bits")
    if isinstance(port_bits, int) and lanes != port_bits // 8:
        raise ConfigError(f"mac_lanes={lanes!r} is not a parameter: the GEMV engine multiplies one port word per "
                          f"cycle, port_bits // 8 = {port_bits // 8} int8 lanes; set port_bits instead")


PRESETS = {
    # Small enough that every Verilator test builds and runs in seconds.
    "tiny": OverlayConfig(
        name="tiny", port_bits=64, vector_lanes=4, group_size=32,
        act_buffer_words=8192, acc_buffer_words=2048, kv_capacity=64, max_layers=4,
        max_kv_heads=4, max_head_dim=64, attn_tile=8, clock_mhz=100.0, dram_bytes=1 << 24,
    ),
    # ULX3S (ECP5-85F): 32 int8 MACs per cycle fed by a 256-bit port. So that the units fit 80% of the 85F
    # (docs/boards.md): groups of 32 or more (int4: one group scale more per window, not seven), and no NORM over
    # each head (the q/k norms of Qwen3-class models, none of which fits the board's 32 MB, run a head at a time).
    # The KV pool is sized to the 85F's block RAM (docs/boards.md, "Block RAM budget"): 32 columns (2 layers of 2
    # KV heads of 64, or any mix) of 64 tokens, 512 Kbit of K and V; layers and tokens beyond go to the host. LDROW
    # takes rows of up to 16 KiB (8 block RAMs, one deep: a table row of 7,936 w16 weights or 15,872 int8 ones).
    # The vector unit and the attention engine run 4 lanes, not 8: 12.8k LUT4 fewer on the board top, for +7-11%
    # cycles per token from block RAM and +0.5-0.9% from the SDRAM a board-sized model streams from
    # (docs/boards.md, "Four vector lanes on ulx3s"). REQ renormalizes one accumulator word per cycle: a lane is about
    # 700 LUT4 (the board top had about 1,200 left under 80%); with 2 the compiler splits the demo's attention, whose
    # program the ulx3s RTL runs as the golden model does since the GEMV engine takes rows that end in half a
    # window (docs/benchmarks.md, "REQ at acc_lanes words per cycle", "The split's divergence on ulx3s").
    "ulx3s": OverlayConfig(
        name="ulx3s", port_bits=256, vector_lanes=4, group_size=32, min_group=32, req_lanes=1,
        norm_heads=False,
        act_buffer_words=16384, ldrow_row_bytes=16384, acc_buffer_words=4096, kv_capacity=64, max_layers=2,
        max_kv_heads=2, max_head_dim=64, attn_tile=16, clock_mhz=50.0, dram_bytes=1 << 25,
        # the attention engine's output scratch: 32 heads of 64 (its 8 block RAMs at 4 or 8 vector lanes)
        max_q_heads=32,
    ),
    # The smallest config that builds every unit: the whole board top's bitstream in CI (docs/boards.md, "The CI
    # bitstream"). The ulx3s preset's features (groups of 32 or more, no NORM over heads, REQ at a word per cycle,
    # 50 MHz) at the least sizes the hardware, the ISA and a two-layer demo decoder (hidden 32, two heads of 16, one KV
    # head) accept.
    "micro": OverlayConfig(
        name="micro", port_bits=64, vector_lanes=2, group_size=32, min_group=32, norm_heads=False, req_lanes=1,
        act_buffer_words=256, acc_buffer_words=128, kv_capacity=16, max_layers=2,
        max_kv_heads=1, max_head_dim=16, attn_tile=4, clock_mhz=50.0, dram_bytes=1 << 16,
    ),
    # Datacenter card with HBM (U280-class): 1024-byte port at 450 MHz ~ 460 GB/s. The on-chip KV pool is sized to
    # the card: 8 layers of 8 KV heads of 128 for 256 tokens, 8 MiB of K and V (a quarter of its 34.6 MB of
    # UltraRAM); a larger model's other layers run on the offload device (docs/benchmarks.md).
    "u280": OverlayConfig(
        name="u280", port_bits=8192, vector_lanes=64, group_size=32,
        act_buffer_words=65536, acc_buffer_words=65536, kv_capacity=256, max_layers=8,
        max_kv_heads=8, max_head_dim=128, attn_tile=64, clock_mhz=450.0, dram_bytes=1 << 32,
    ),
}


def preset(name: str) -> OverlayConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def load_config(spec: str | Path | OverlayConfig | None) -> OverlayConfig:
    """Resolve a preset name, a TOML file path or a config object."""
    if spec is None:
        return PRESETS["tiny"]
    if isinstance(spec, OverlayConfig):
        return spec
    spec = str(spec)
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {spec}: {exc.strerror}") from None
        return OverlayConfig.from_toml(text)
    raise ConfigError(f"unknown config {spec!r}: not a preset ({', '.join(PRESETS)}) nor a TOML file")
