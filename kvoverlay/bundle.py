"""Program bundle (``.kvo``): one file holding a compiled program for the overlay.

Layout (all integers little-endian)::

    8 bytes   magic b"KVOPROG\\0"
    uint32    format version (2)
    uint64    manifest length in bytes
    manifest  UTF-8 JSON, keys sorted, compact separators
    sections  back to back, each padded with zeros to a multiple of 16 bytes

Section offsets in the manifest are absolute file offsets. The manifest holds
``format_version``, ``config`` (:meth:`OverlayConfig.to_dict`), ``sections``
(name, offset, length, sha256) and ``meta``: the free-form metadata of the
:class:`Bundle` (io bindings, KV layout, placement ...). The sections are the
instruction stream, the memory image and, when the program carries one, the
``tokenizer`` (the ``tokenizer.json`` of the Hugging Face ``tokenizers`` format,
as found beside the model); a program without it has the same bytes as before
the section existed. Identical inputs give identical bytes; nothing is
unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from . import isa
from . import numerics as nx
from .config import ConfigError, OverlayConfig
from .fileio import write_atomic

__all__ = ["FORMAT_VERSION", "MAGIC", "Bundle", "BundleError", "encoded_size", "from_bytes", "load", "logits_records",
           "read_logits", "save", "to_bytes"]

MAGIC = b"KVOPROG\0"
#: 2: KVAPPEND and ATTN address the KV pool by ``kv_base`` (a program of version 1 named a layer slot there, and
#: would decode to other columns), and the optional tokenizer section.
FORMAT_VERSION = 2
ALIGN = 16
_HEADER = struct.Struct("<8sIQ")
_SECTIONS = ("instructions", "image")
_OPTIONAL_SECTIONS = ("tokenizer",)


class BundleError(ValueError):
    """A program bundle that cannot be read: bad magic, truncation, checksum, version or manifest."""


@dataclass
class Bundle:
    """A compiled program: its overlay config, instruction stream, memory image, metadata and, optionally, the
    model's tokenizer (``tokenizer.json`` bytes)."""

    config: OverlayConfig
    instructions: list
    image: bytes
    manifest: dict = field(default_factory=dict)
    tokenizer: bytes | None = None


def _pad(n: int) -> int:
    return -n % ALIGN


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def to_bytes(bundle: Bundle) -> bytes:
    """Serialize *bundle* to the ``.kvo`` byte layout."""
    return b"".join(_pieces(bundle))


def encoded_size(bundle: Bundle) -> int:
    """Length of :func:`to_bytes` without building it."""
    return sum(len(p) for p in _pieces(bundle))


def _pieces(bundle: Bundle) -> list:
    """The ``.kvo`` layout as a list of byte strings (the payloads are not copied)."""
    if not isinstance(bundle.config, OverlayConfig):
        raise BundleError(f"bundle config must be an OverlayConfig, got {type(bundle.config).__name__}")
    if not isinstance(bundle.manifest, dict):
        raise BundleError(f"bundle manifest must be a dict, got {type(bundle.manifest).__name__}")
    image = bundle.image if isinstance(bundle.image, (bytes, bytearray)) else bytes(bundle.image)
    payloads = {"instructions": isa.encode_program(bundle.instructions), "image": image}
    if bundle.tokenizer is not None:
        if not isinstance(bundle.tokenizer, (bytes, bytearray)):
            raise BundleError(f"bundle tokenizer must be bytes, got {type(bundle.tokenizer).__name__}")
        payloads["tokenizer"] = bytes(bundle.tokenizer)
    sections = [{"name": n, "length": len(payloads[n]), "sha256": hashlib.sha256(payloads[n]).hexdigest()}
                for n in (*_SECTIONS, *_OPTIONAL_SECTIONS) if n in payloads]

    def manifest_bytes():
        try:
            return _dumps({"format_version": FORMAT_VERSION, "config": bundle.config.to_dict(),
                           "meta": bundle.manifest, "sections": sections})
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bundle manifest is not JSON-serializable: {exc}") from None

    # Offsets depend on the manifest length, which depends on the offsets' digits: iterate to a fixed point.
    for s in sections:
        s["offset"] = 0
    for _ in range(8):
        mlen = len(manifest_bytes())
        pos = _HEADER.size + mlen + _pad(_HEADER.size + mlen)
        changed = False
        for s in sections:
            if s["offset"] != pos:
                s["offset"], changed = pos, True
            pos += s["length"] + _pad(s["length"])
        if not changed:
            break
    manifest = manifest_bytes()
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest)) + manifest
    out = [head + bytes(_pad(len(head)))]
    pos = len(out[0])
    for s in sections:
        assert pos == s["offset"]
        data = payloads[s["name"]]
        out += [data, bytes(_pad(len(data)))]
        pos += len(data) + _pad(len(data))
    return out


def from_bytes(blob: bytes) -> Bundle:
    """Parse ``.kvo`` bytes; any defect raises :class:`BundleError`."""
    blob = bytes(blob)
    if len(blob) < len(MAGIC) or blob[:len(MAGIC)] != MAGIC:
        if len(blob) < len(MAGIC) and MAGIC.startswith(blob) and blob:
            raise BundleError(f"truncated kvoverlay program: {len(blob)} bytes, header needs {_HEADER.size}")
        raise BundleError("not a kvoverlay program (bad magic)")
    if len(blob) < _HEADER.size:
        raise BundleError(f"truncated kvoverlay program: {len(blob)} bytes, header needs {_HEADER.size}")
    _, version, mlen = _HEADER.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise BundleError(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
    if len(blob) < _HEADER.size + mlen:
        raise BundleError(f"truncated kvoverlay program: manifest needs {_HEADER.size + mlen} bytes, file has {len(blob)}")
    try:
        manifest = json.loads(blob[_HEADER.size:_HEADER.size + mlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"corrupt manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError("corrupt manifest: not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"corrupt manifest: format_version {manifest.get('format_version')!r} "
                          f"disagrees with header version {FORMAT_VERSION}")
    sections = manifest.get("sections")
    if not isinstance(sections, list) or not all(isinstance(s, dict) for s in sections):
        raise BundleError("corrupt manifest: 'sections' must be a list of objects")
    payloads = {}
    for s in sections:
        name, off, length, digest = s.get("name"), s.get("offset"), s.get("length"), s.get("sha256")
        if (not isinstance(name, str) or not isinstance(digest, str)
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (off, length))):
            raise BundleError(f"corrupt manifest: bad section entry {s!r}")
        if name in payloads:
            raise BundleError(f"corrupt manifest: duplicate section {name!r}")
        if off < _HEADER.size + mlen:
            raise BundleError(f"corrupt manifest: section {name!r} overlaps the header")
        if off + length > len(blob):
            raise BundleError(f"truncated kvoverlay program: section {name!r} needs {off + length} bytes, file has {len(blob)}")
        data = blob[off:off + length]
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"checksum mismatch in section {name!r}")
        payloads[name] = data
    end = max((s["offset"] + s["length"] + _pad(s["length"]) for s in sections), default=_HEADER.size + mlen)
    if len(blob) < end:
        raise BundleError(f"truncated kvoverlay program: {end} bytes expected, file has {len(blob)}")
    for name in _SECTIONS:
        if name not in payloads:
            raise BundleError(f"corrupt manifest: missing section {name!r}")
    meta = manifest.get("meta", {})
    if not isinstance(meta, dict):
        raise BundleError("corrupt manifest: 'meta' must be an object")
    try:
        config = OverlayConfig.from_dict(manifest.get("config"))
    except ConfigError as exc:
        raise ConfigError(f"bundle config is invalid: {exc}") from exc
    try:
        instructions = isa.decode_program(payloads["instructions"])
    except isa.IsaError as exc:
        raise BundleError(f"bundle instruction stream is invalid: {exc}") from exc
    return Bundle(config=config, instructions=instructions, image=payloads["image"], manifest=meta,
                  tokenizer=payloads.get("tokenizer"))


def save(bundle: Bundle, path: str | os.PathLike) -> None:
    """Write *bundle* to *path* atomically."""
    write_atomic(path, _pieces(bundle))


def load(path: str | os.PathLike) -> Bundle:
    """Read a bundle from *path*."""
    with open(path, "rb") as fh:
        return from_bytes(fh.read())


def logits_records(spec: dict) -> list:
    """``(address, length)`` of each vector record a program leaves its logits in (the manifest's ``logits``): one,
    or one per tile, in row order, of an LM head tiled over the accumulator buffer (``tiles``), each tile with the
    exponent of its own REQ; none for a program compiled without logits (``tiles`` empty, no ``addr``)."""
    if "tiles" in spec:
        return [(int(a), int(n)) for a, n in spec["tiles"]]
    return [(int(spec["addr"]), int(spec["len"]))]


def read_logits(spec: dict, read_record) -> np.ndarray | None:
    """The logits (float64) from their records, joined, or None for a program compiled without logits:
    *read_record(addr, length)* gives one record's ``(mantissas, exponent)``."""
    records = logits_records(spec)
    return np.concatenate([nx.to_float(*read_record(a, n)) for a, n in records]) if records else None
