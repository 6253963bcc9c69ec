"""Program bundle (.kvo): round trip, determinism, corruption errors, atomic save."""

import hashlib
import json
import os
import struct

import pytest

from kvoverlay import bundle as kvo
from kvoverlay import isa
from kvoverlay.bundle import Bundle, BundleError
from kvoverlay.config import PRESETS, ConfigError


def program():
    """Every opcode once, with mid-range field values."""
    out = []
    for op in isa.OPCODES:
        fields = {f.name: max(f.lo, min(f.hi, 3)) * f.scale for f in op.fields}
        out.append(isa.Instr(op.name, fields))
    return out


def make_bundle(image=bytes(range(256)) * 3 + b"tail"):
    meta = {"io": {"input_ids": {"addr": 4096, "len": 8}}, "kv": {"layers": 2, "heads": 2},
            "placement": [{"name": "w0", "addr": 0, "bytes": 4096}], "note": "ünïcode"}
    return Bundle(config=PRESETS["tiny"], instructions=program(), image=image, manifest=meta)


def test_round_trip(tmp_path):
    b = make_bundle()
    path = tmp_path / "p.kvo"
    kvo.save(b, path)
    got = kvo.load(path)
    assert got == b
    assert got.config == PRESETS["tiny"]
    assert isa.encode_program(got.instructions) == isa.encode_program(b.instructions)
    assert kvo.from_bytes(kvo.to_bytes(b)) == b


def test_layout():
    blob = kvo.to_bytes(make_bundle())
    magic, version, mlen = struct.unpack_from("<8sIQ", blob)
    assert magic == b"KVOPROG\0" and version == 2
    manifest = json.loads(blob[20:20 + mlen])
    assert blob[20:20 + mlen] == json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["format_version"] == 2
    assert manifest["config"] == PRESETS["tiny"].to_dict()
    names = [s["name"] for s in manifest["sections"]]
    assert names == ["instructions", "image"]
    for s in manifest["sections"]:
        assert s["offset"] % 16 == 0
        data = blob[s["offset"]:s["offset"] + s["length"]]
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
    assert len(blob) % 16 == 0


def test_decode_program_preserved():
    b = make_bundle()
    blob = kvo.to_bytes(b)
    manifest = json.loads(blob[20:20 + struct.unpack_from("<Q", blob, 12)[0]])
    s = next(s for s in manifest["sections"] if s["name"] == "instructions")
    stream = blob[s["offset"]:s["offset"] + s["length"]]
    assert stream == isa.encode_program(b.instructions)
    assert isa.decode_program(stream) == b.instructions
    assert kvo.from_bytes(blob).instructions == isa.decode_program(isa.encode_program(program()))


def test_empty_sections():
    b = Bundle(config=PRESETS["ulx3s"], instructions=[], image=b"", manifest={})
    assert kvo.from_bytes(kvo.to_bytes(b)) == b


def test_deterministic(tmp_path):
    kvo.save(make_bundle(), tmp_path / "a.kvo")
    kvo.save(make_bundle(), tmp_path / "b.kvo")
    assert (tmp_path / "a.kvo").read_bytes() == (tmp_path / "b.kvo").read_bytes()


@pytest.mark.parametrize("frac", [0.0, 0.1, 0.3, 0.5, 0.8, 0.99])
def test_truncated(frac):
    blob = kvo.to_bytes(make_bundle())
    # keep at least the first byte of the magic so the error is about truncation; cut inside the last section's data
    cut = max(1, int(len(blob) * frac))
    with pytest.raises(BundleError, match="truncated"):
        kvo.from_bytes(blob[:cut])


@pytest.mark.parametrize("cut", [1, 7, 8, 12, 19, 20, 21])
def test_truncated_header(cut):
    blob = kvo.to_bytes(make_bundle())
    with pytest.raises(BundleError, match="truncated"):
        kvo.from_bytes(blob[:cut])


def test_truncated_every_length():
    blob = kvo.to_bytes(make_bundle(image=b"abc"))
    for cut in range(1, len(blob)):
        with pytest.raises(BundleError, match="truncated"):
            kvo.from_bytes(blob[:cut])


def test_empty_file_is_not_a_program():
    with pytest.raises(BundleError, match="not a kvoverlay program"):
        kvo.from_bytes(b"")


def _section(blob, name):
    manifest = json.loads(blob[20:20 + struct.unpack_from("<Q", blob, 12)[0]])
    return next(s for s in manifest["sections"] if s["name"] == name)


@pytest.mark.parametrize("name", ["image", "instructions"])
def test_flipped_byte(name):
    blob = bytearray(kvo.to_bytes(make_bundle()))
    s = _section(blob, name)
    blob[s["offset"] + s["length"] // 2] ^= 0x40
    with pytest.raises(BundleError, match=f"checksum mismatch in section '{name}'"):
        kvo.from_bytes(bytes(blob))


@pytest.mark.parametrize("version", [7, 1])
def test_wrong_version(version):
    """A version 1 program (KVAPPEND and ATTN naming a layer slot, not a pool column) is refused, not misread."""
    blob = bytearray(kvo.to_bytes(make_bundle()))
    struct.pack_into("<I", blob, 8, version)
    with pytest.raises(BundleError, match=rf"unsupported format version {version} \(this build reads 2\)"):
        kvo.from_bytes(bytes(blob))


def test_bad_magic(tmp_path):
    path = tmp_path / "x.kvo"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(BundleError, match=r"not a kvoverlay program \(bad magic\)"):
        kvo.load(path)


def test_corrupt_manifest():
    blob = bytearray(kvo.to_bytes(make_bundle()))
    blob[20] = ord("[") if blob[20] != ord("[") else ord("{")
    blob[21] = 0xFF
    with pytest.raises(BundleError, match="corrupt manifest"):
        kvo.from_bytes(bytes(blob))


def test_errors_are_one_line():
    blob = kvo.to_bytes(make_bundle())
    for bad in (blob[:30], b"nope" * 10, blob[:8] + b"\x09" + blob[9:]):
        with pytest.raises(BundleError) as info:
            kvo.from_bytes(bad)
        assert "\n" not in str(info.value)
    assert issubclass(BundleError, ValueError)


def test_bad_config_is_config_error():
    b = make_bundle()
    blob = kvo.to_bytes(b)
    mlen = struct.unpack_from("<Q", blob, 12)[0]
    manifest = json.loads(blob[20:20 + mlen])
    manifest["config"]["vector_lanes"] = 3
    new = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert len(new) == mlen
    with pytest.raises(ConfigError, match="bundle config is invalid: vector_lanes=3 must be a power of two"):
        kvo.from_bytes(blob[:20] + new + blob[20 + mlen:])


def test_unserializable_manifest():
    b = make_bundle()
    b.manifest = {"x": object()}
    with pytest.raises(BundleError, match="not JSON-serializable"):
        kvo.to_bytes(b)


def test_atomic_save_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "p.kvo"
    kvo.save(make_bundle(), path)
    assert sorted(os.listdir(tmp_path)) == ["p.kvo"]
    old = path.read_bytes()

    def boom(src, dst):
        raise OSError("simulated failure")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated failure"):
        kvo.save(make_bundle(image=b"different"), path)
    assert sorted(os.listdir(tmp_path)) == ["p.kvo"]
    assert path.read_bytes() == old
