"""Small decoders exported by the real exporter (optimum-onnx), built reproducibly and cached.

``export_model(family)`` builds a random-init transformers model (``llama``: GQA,
``qwen2``: MQA with QKV bias and tied embeddings, ``gpt2``: LayerNorm, learned
positions, tanh GELU, fused ``c_attn``) under a fixed torch seed, saves it with
``save_pretrained`` and exports it with optimum-onnx (task
``text-generation-with-past``, opset 18, fp32) to one ``model.onnx`` with
past/present KV inputs and outputs. Shapes are small enough for the ``tiny``
overlay preset.

Random-init models tend to repeat one token under greedy decoding, which would
let a broken KV path pass a decoding test by accident. So the weight matrices
(every parameter of rank >= 2) are multiplied by the first factor of
``WEIGHT_SCALES`` for which greedy decoding of ``CHECK_TOKENS`` tokens after
``CHECK_PROMPT`` with onnxruntime yields at least ``MIN_DISTINCT`` distinct
tokens; the factor and the decoding statistics are stored next to the model in
``export.json``.

Exports are cached under ``<repo>/.cache/models/`` (or ``$KVOVERLAY_CACHE``),
keyed by a hash of the family, the overrides, the versions of torch,
transformers and optimum-onnx, and this module's source. torch, transformers
and optimum are imported only when an export is actually needed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .demo_model import greedy_decode_ort as _greedy_tokens

__all__ = ["CHECK_PROMPT", "CHECK_TOKENS", "FAMILIES", "MIN_DISTINCT", "WEIGHT_SCALES", "Decode", "cache_root",
           "export_info", "export_model", "greedy_decode_ort"]

EXPORT_OPSET = 18
CHECK_PROMPT = (5, 17, 42)
CHECK_TOKENS = 16
MIN_DISTINCT = 8
WEIGHT_SCALES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
_EXPORT_DEPS = ("torch", "transformers", "optimum-onnx")
_INSTALL_HINT = 'pip install -e ".[export]"'

# Config class name and keyword arguments per family. Shapes fit the ``tiny`` preset
# (kvoverlay.config: 4 layers, 4 KV heads, head_dim 64, KV capacity 64).
_SMALL = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2,
          "pad_token_id": 0}
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {**_SMALL, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {**_SMALL, "num_key_value_heads": 1, "tie_word_embeddings": True,
                              "use_sliding_window": False}),
    "gpt2": ("GPT2Config", {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128,
                            "n_positions": 128, "activation_function": "gelu_new", "bos_token_id": 1,
                            "eos_token_id": 2, "pad_token_id": 0}),
}


@dataclass(frozen=True)
class Decode:
    """Result of :func:`greedy_decode_ort`."""

    tokens: list[int]
    logits: list[np.ndarray]  # last-position fp32 logits of each step
    min_margin: float  # smallest top-1 minus top-2 logit over the steps

    @property
    def distinct(self) -> int:
        return len(set(self.tokens))


def greedy_decode_ort(model_path, prompt, new_tokens: int) -> Decode:
    """Greedy decoding with fp32 onnxruntime, feeding present KV back as past KV.

    *model_path* is a path, a ``ModelProto`` or an ``InferenceSession``.
    """
    tokens, logits = _greedy_tokens(model_path, prompt, new_tokens)
    margins = [float(np.diff(np.sort(lg)[-2:])[0]) for lg in logits]
    return Decode(tokens, logits, min(margins) if margins else float("inf"))


def cache_root() -> Path:
    """``$KVOVERLAY_CACHE`` if set, else ``<repo>/.cache/models``."""
    env = os.environ.get("KVOVERLAY_CACHE")
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".cache" / "models"


def _versions() -> dict[str, str]:
    out = {}
    for dist in _EXPORT_DEPS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(f"exporting models needs {dist}, which is not installed: {_INSTALL_HINT}") from None
    return out


def _cache_key(family: str, seed: int, overrides: dict) -> str:
    blob = json.dumps({"family": family, "seed": seed, "overrides": overrides, "versions": _versions(),
                       "source": Path(__file__).read_text()}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _config(family: str, overrides: dict):
    import transformers

    cls_name, kwargs = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def _export_once(family: str, seed: int, overrides: dict, workdir: Path, scale: float) -> Path:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, overrides), attn_implementation="sdpa")
    with torch.no_grad():
        # Tied embeddings share one tensor: scale each storage once.
        seen = set()
        for p in model.parameters():
            if p.dim() >= 2 and p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                p.mul_(scale)
    src, out = workdir / f"hf_{scale:g}", workdir / f"onnx_{scale:g}"
    model.save_pretrained(src)
    main_export(str(src), output=str(out), task="text-generation-with-past", opset=EXPORT_OPSET, device="cpu",
                dtype="fp32", no_post_process=True, do_validation=False, local_files_only=True)
    return out / "model.onnx"


def export_model(family: str, cache_dir: str | os.PathLike | None = None, *, seed: int = 0, **overrides) -> Path:
    """Return the path of the cached ``model.onnx`` for *family*, exporting it first if needed.

    *overrides* are transformers config keyword arguments (e.g. ``num_hidden_layers=1``).
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {sorted(FAMILIES)}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"{family}-{_cache_key(family, seed, overrides)}"
    if (final / "model.onnx").is_file():
        return final / "model.onnx"
    try:
        import optimum.exporters.onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"exporting models needs torch, transformers and optimum-onnx ({e.name} is missing):"
                          f" {_INSTALL_HINT}") from None
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{family}-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        for scale in WEIGHT_SCALES:
            onnx_path = _export_once(family, seed, overrides, work, scale)
            dec = greedy_decode_ort(onnx_path, CHECK_PROMPT, CHECK_TOKENS)
            if dec.distinct >= MIN_DISTINCT:
                break
        else:
            raise RuntimeError(f"{family}: no weight scale in {WEIGHT_SCALES} gives {MIN_DISTINCT} distinct greedy"
                               f" tokens (last: {dec.tokens})")
        stage = work / "final"
        stage.mkdir()
        shutil.copy2(onnx_path, stage / "model.onnx")
        info = {"family": family, "seed": seed, "overrides": overrides, "versions": _versions(), "weight_scale": scale,
                "config": _config(family, overrides).to_dict(), "check_prompt": list(CHECK_PROMPT),
                "check_tokens": dec.tokens, "distinct": dec.distinct, "min_margin": dec.min_margin,
                "export_seconds": round(time.perf_counter() - t0, 2),
                "file_bytes": (stage / "model.onnx").stat().st_size}
        (stage / "export.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=repr) + "\n")
        try:
            os.rename(stage, final)  # atomic; a concurrent exporter may have won the race
        except OSError:
            if not (final / "model.onnx").is_file():
                raise
    return final / "model.onnx"


def export_info(model_path: str | os.PathLike) -> dict:
    """The ``export.json`` written next to an exported model."""
    return json.loads((Path(model_path).parent / "export.json").read_text())
