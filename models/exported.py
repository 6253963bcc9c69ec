"""Small decoders exported by the real exporter (optimum-onnx), built reproducibly and cached.

``export_model(family)`` builds a random-init transformers model (``llama``: GQA,
``mistral``: full multi-head KV,
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
tokens. Norm weights and biases (HF sets them to exactly 1 and 0) get
``VECTOR_JITTER`` noise so that dropping one of them changes the outputs.
The factor and the decoding statistics are stored next to the model in
``export.json``.

Exports are cached under ``<repo>/.cache/models/`` (or ``$KVOVERLAY_CACHE``),
keyed by a hash of the family, the overrides, the versions of torch,
transformers and optimum-onnx, and this module's source. torch, transformers
and optimum are imported only when an export is actually needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .demo import greedy_decode_ort as _greedy_tokens

__all__ = ["CHECK_PROMPT", "CHECK_TOKENS", "FAMILIES", "MIN_DISTINCT", "WEIGHT_SCALES", "Decode",
           "build_onnx_ops_decoder", "cache_root", "export_info", "export_model", "greedy_decode_ort"]

EXPORT_OPSET = 18
ONNX_OPS_OPSET = 23  # first opset with Attention, RMSNormalization and RotaryEmbedding
CHECK_PROMPT = (5, 17, 42)
CHECK_TOKENS = 16
MIN_DISTINCT = 8
VECTOR_JITTER = 0.1  # std of the noise added to norm weights and biases
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
    "mistral": ("MistralConfig", {**_SMALL, "num_key_value_heads": 4, "head_dim": 16, "sliding_window": None,
                                  "tie_word_embeddings": False}),
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
    cls = getattr(transformers, cls_name)
    default = cls()
    for key, value in overrides.items():  # configs swallow unknown keywords silently
        if not hasattr(default, key):
            raise ValueError(f"override {key}={value!r} is not a {cls_name} field")
    return cls(**{**kwargs, **overrides})


def _export_once(family: str, seed: int, overrides: dict, workdir: Path, scale: float) -> Path:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForCausalLM

    # The tracer's warnings are expected for these models (and fatal under ``python -W error``).
    warnings.simplefilter("ignore")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return _export_scaled(family, seed, overrides, workdir, scale, torch, main_export, AutoModelForCausalLM)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _export_scaled(family, seed, overrides, workdir, scale, torch, main_export, auto_model) -> Path:
    torch.manual_seed(seed)
    model = auto_model.from_config(_config(family, overrides), attn_implementation="sdpa")
    with torch.no_grad():
        # HF initializes norm weights to 1 and biases to 0, which would leave a compiler that drops
        # them (or Qwen2's QKV bias) untested: perturb every vector parameter. Tied embeddings share
        # one tensor: scale each storage once.
        gen = torch.Generator().manual_seed(seed)
        seen = set()
        for p in model.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            if p.dim() >= 2:
                p.mul_(scale)
            else:
                p.add_(VECTOR_JITTER * torch.randn(p.shape, generator=gen))
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # import-time deprecation notices of the exporter stack
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
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
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


def _onnx_ops_graph(vocab, hidden, layers, heads, kv_heads, head_dim, ffn, max_positions, seed, scale, rope_theta, eps):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, arr, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype), name))
        return name

    def op(op_type, inputs, outputs, **attrs):
        outs = [outputs] if isinstance(outputs, str) else outputs
        nodes.append(helper.make_node(op_type, inputs, outs, name=f"/{outs[0]}/{op_type}", **attrs))
        return outputs

    def linear(x, name, n_in, n_out):
        w = const(f"{name}.weight", rng.standard_normal((n_in, n_out)) * (scale / np.sqrt(n_in)))
        return op("MatMul", [x, w], f"{name}/out")

    def norm(x, name):
        w = const(f"{name}.weight", 1.0 + 0.1 * rng.standard_normal(hidden))
        return op("RMSNormalization", [x, w], f"{name}/out", axis=-1, epsilon=eps)

    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)  # [positions, head_dim / 2]
    cos, sin = const("rotary.cos_cache", np.cos(angles)), const("rotary.sin_cache", np.sin(angles))
    h = op("Gather", [const("model.embed_tokens.weight", rng.standard_normal((vocab, hidden)) * scale), "input_ids"],
           "model/embed_tokens", axis=0)
    # [B, T] padding mask -> boolean [B, 1, S, T] (onnxruntime wants the query length spelled out);
    # Attention adds the causal part itself (is_causal).
    mask = op("Unsqueeze", [op("Cast", ["attention_mask"], "model/mask_bool", to=TensorProto.BOOL),
                            const("model.mask_axes", [1, 2], np.int64)], "model/mask_b11t")
    one_one = const("model.mask_shape_head", [1, 1], np.int64)
    one = const("model.mask_shape_tail", [1], np.int64)
    q_len = op("Shape", ["input_ids"], "model/query_len", start=1, end=2)
    mask = op("Expand", [mask, op("Concat", [one_one, q_len, one], "model/mask_shape", axis=0)], "model/attn_mask")
    for i in range(layers):
        pre = f"model.layers.{i}"
        x = norm(h, f"{pre}.input_layernorm")
        q = linear(x, f"{pre}.self_attn.q_proj", hidden, heads * head_dim)
        k = linear(x, f"{pre}.self_attn.k_proj", hidden, kv_heads * head_dim)
        v = linear(x, f"{pre}.self_attn.v_proj", hidden, kv_heads * head_dim)
        q = op("RotaryEmbedding", [q, cos, sin, "position_ids"], f"{pre}.self_attn/rope_q", num_heads=heads)
        k = op("RotaryEmbedding", [k, cos, sin, "position_ids"], f"{pre}.self_attn/rope_k", num_heads=kv_heads)
        a, _, _ = op("Attention", [q, k, v, mask, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
                     [f"{pre}.self_attn/attention", f"present.{i}.key", f"present.{i}.value"],
                     q_num_heads=heads, kv_num_heads=kv_heads, is_causal=1)
        h = op("Add", [h, linear(a, f"{pre}.self_attn.o_proj", heads * head_dim, hidden)], f"{pre}/attn_residual")
        x = norm(h, f"{pre}.post_attention_layernorm")
        gate = linear(x, f"{pre}.mlp.gate_proj", hidden, ffn)
        silu = op("Mul", [gate, op("Sigmoid", [gate], f"{pre}.mlp/sigmoid")], f"{pre}.mlp/silu")
        m = op("Mul", [silu, linear(x, f"{pre}.mlp.up_proj", hidden, ffn)], f"{pre}.mlp/gated")
        h = op("Add", [h, linear(m, f"{pre}.mlp.down_proj", ffn, hidden)], f"{pre}/mlp_residual")
    op("MatMul", [norm(h, "model.norm"), const("lm_head.weight", rng.standard_normal((hidden, vocab))
                                                * (scale / np.sqrt(hidden)))], "logits")

    b, s, p, t = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, [b, s]),
              helper.make_tensor_value_info("attention_mask", i64, [b, t]),
              helper.make_tensor_value_info("position_ids", i64, [b, s])]
    outputs = [helper.make_tensor_value_info("logits", f32, [b, s, vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, [b, kv_heads, p, head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, [b, kv_heads, t, head_dim]))
    graph = helper.make_graph(nodes, "onnx_ops_decoder", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPS_OPSET)],
                              producer_name="kvoverlay.models.exported")
    model.ir_version = 10  # opset 23 needs IR >= 10; onnxruntime reads it
    onnx.checker.check_model(model, full_check=True)
    return model


def build_onnx_ops_decoder(path: str | os.PathLike | None = None, *, vocab: int = 256, hidden: int = 64,
                           layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, ffn: int = 128,
                           max_positions: int = 128, seed: int = 0, weight_scale: float | None = None,
                           rope_theta: float = 10000.0, eps: float = 1e-5):
    """A small Llama-style decoder made of ONNX's own opset-23 ``Attention`` (GQA, past/present KV),
    ``RMSNormalization`` and ``RotaryEmbedding`` ops, with the optimum export's graph I/O.

    Projections have std ``weight_scale / sqrt(in)``; with ``weight_scale=None`` the first of
    ``WEIGHT_SCALES`` passing the same varied-greedy-tokens rule as :func:`export_model` is used.
    Returns the ``ModelProto`` (saved to *path* if given).
    """
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even")
    shape = (vocab, hidden, layers, heads, kv_heads, head_dim, ffn, max_positions, seed)
    if weight_scale is not None:
        model = _onnx_ops_graph(*shape, weight_scale, rope_theta, eps)
    else:
        for scale in WEIGHT_SCALES:
            model = _onnx_ops_graph(*shape, scale, rope_theta, eps)
            if greedy_decode_ort(model, CHECK_PROMPT, CHECK_TOKENS).distinct >= MIN_DISTINCT:
                break
        else:
            raise RuntimeError(f"onnx_ops decoder: no weight scale in {WEIGHT_SCALES} gives {MIN_DISTINCT} distinct"
                               " greedy tokens")
    if path is not None:
        import onnx

        onnx.save(model, os.fspath(path))
    return model


def _main(argv=None) -> int:
    import argparse
    import collections

    from kvoverlay.compiler.passes import run_passes

    ap = argparse.ArgumentParser(prog="python -m kvoverlay.models.exported",
                                 description="Export (or reuse cached) small decoders; report decoding statistics and the"
                                             " op histogram of the folded graph.")
    ap.add_argument("families", nargs="*", default=[*FAMILIES, "onnx_ops"])
    ap.add_argument("--dump-dir", help="write run_passes dumps of each model into DIR/<family>/")
    ap.add_argument("--kv-len", type=int, default=5)
    args = ap.parse_args(argv)
    for fam in args.families:
        path = build_onnx_ops_decoder() if fam == "onnx_ops" else export_model(fam)
        dump = None if args.dump_dir is None else os.path.join(args.dump_dir, fam)
        graph = run_passes(path, dump, kv_len=args.kv_len)
        dec = greedy_decode_ort(path, CHECK_PROMPT, CHECK_TOKENS)
        hist = collections.Counter(n.op for n in graph.nodes).most_common()
        extra = "" if fam == "onnx_ops" else f" weight_scale={export_info(path)['weight_scale']:g}" \
            f" export_s={export_info(path)['export_seconds']}"
        size = path.ByteSize() if fam == "onnx_ops" else Path(path).stat().st_size
        print(f"{fam}: {'(in memory)' if fam == 'onnx_ops' else path} bytes={size}{extra} distinct={dec.distinct}/{CHECK_TOKENS}"
              f" min_margin={dec.min_margin:.4g} tokens={dec.tokens}")
        print(f"  folded ops at kv_len={args.kv_len} ({len(graph.nodes)} nodes): "
              + ", ".join(f"{op} {n}" for op, n in hist))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
