"""onnxruntime as the reference: greedy decoding and teacher-forced logits of an optimum-style decoder."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["CheckModelError", "compare", "matching_prefix", "open_reference", "ort_decode", "ort_logits"]


class CheckModelError(ValueError):
    """A ``--check`` model that cannot serve as the reference of a program."""


def open_reference(path, vocab: int):
    """Load the ONNX decoder at *path* for ``--check``, before any decoding: it must exist, be ONNX that
    onnxruntime loads, have ``input_ids`` and ``logits``, and produce *vocab* logits (the program's vocabulary).

    Returns the ``InferenceSession``; raises :class:`CheckModelError` naming what is wrong.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckModelError(f"--check {path}: no such file")
    try:
        sess = _session(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for unreadable models
        msg = " ".join(str(exc).split())[:200]
        raise CheckModelError(f"--check {path}: not an ONNX model onnxruntime can load ({msg})") from None
    inputs = {i.name for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    if "input_ids" not in inputs or "logits" not in outputs:
        raise CheckModelError(f"--check {path}: not a decoder with input_ids and logits "
                             f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})")
    width = outputs["logits"].shape[-1] if outputs["logits"].shape else None
    if not isinstance(width, int):  # a symbolic vocabulary: one step tells
        _, logits = ort_decode(sess, [0], 1)
        width = int(logits[0].shape[-1])
    if width != vocab:
        raise CheckModelError(f"--check {path}: the model's vocabulary has {width} tokens, the program's {vocab}")
    return sess


def _session(model):
    import onnx
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _feed(names, ids, pos: int, cache: dict) -> dict:
    """The inputs of one onnxruntime call: *ids* at positions from *pos* after *cache*, as the model declares
    them (GPT-2 exports may lack ``position_ids``)."""
    seq = ids.shape[1]
    feed = {"input_ids": ids, **cache}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((1, pos + seq), np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.arange(pos, pos + seq, dtype=np.int64).reshape(1, -1)
    return feed


def _empty_cache(names) -> dict:
    return {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for n, i in names.items()
            if n.startswith("past_key_values")}


def ort_logits(model, ids) -> np.ndarray:
    """fp32 onnxruntime logits at every position of *ids* from an empty cache (one call): row i predicts
    token i + 1."""
    sess = _session(model)
    names = {i.name: i for i in sess.get_inputs()}
    feed = _feed(names, np.asarray(ids, np.int64).reshape(1, -1), 0, _empty_cache(names))
    return sess.run(["logits"], feed)[0][0]


def ort_decode(model, prompt, new_tokens: int, forced=None):
    """Greedy decoding with fp32 onnxruntime, feeding the KV cache back.

    *model* is a ``ModelProto``, a path or an ``InferenceSession``. The prompt is prefilled in one call,
    then one token per call; only the inputs the model declares are fed (GPT-2 exports may lack
    ``position_ids``). With *forced*
    (a list of *new_tokens* tokens), each step feeds the forced token instead of
    its own choice, so the logits are those of that exact sequence. Returns
    ``(tokens, logits)``: the argmax tokens and the last-position logits (float32) per step.
    """
    sess = _session(model)
    names = {i.name: i for i in sess.get_inputs()}
    cache = _empty_cache(names)
    past = list(cache)
    outs = ["logits"] + [n.replace("past_key_values", "present") for n in past]
    ids = np.asarray(prompt, np.int64).reshape(1, -1)
    pos = 0
    tokens, logits = [], []
    for step in range(new_tokens):
        seq = ids.shape[1]
        res = sess.run(outs, _feed(names, ids, pos, cache))
        last = res[0][0, -1]
        tokens.append(int(np.argmax(last)))
        logits.append(last)
        cache = dict(zip(past, res[1:], strict=True))
        pos += seq
        nxt = forced[step] if forced is not None else tokens[-1]
        ids = np.array([[nxt]], np.int64)
    return tokens, logits


def matching_prefix(got, want) -> int:
    """How many leading tokens of *got* and *want* agree.

    Greedy decoding feeds each token back, so after the first difference the two runs continue different
    sequences and a later equal token is a coincidence, not agreement.
    """
    n = 0
    for a, b in zip(got, want):
        if a != b:
            break
        n += 1
    return n


def compare(model, prompt, tokens, logits) -> dict:
    """Check overlay *tokens*/*logits* against onnxruntime on *model* for the same prompt.

    ``tokens`` of the reference is its own greedy decoding and ``matching_prefix`` the number of leading
    tokens on which both agree; cosine and error are taken on teacher-forced logits (onnxruntime fed the
    overlay's tokens), so a single flipped token does not make every later step incomparable.
    ``top2_margin_min`` is the smallest gap between the reference's two largest logits: where it is below
    the logits error, greedy tokens may flip.
    """
    n = len(tokens)
    ref_tokens, _ = ort_decode(model, prompt, n)
    _, forced_logits = ort_decode(model, prompt, n, forced=tokens)
    cos, err, margins = [], [], []
    for got, want in zip(logits, forced_logits, strict=True):
        got = np.asarray(got, np.float64)
        want = np.asarray(want, np.float64)
        cos.append(float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))))
        err.append(float(np.max(np.abs(got - want))))
        top = np.sort(want)[-2:]
        margins.append(float(top[1] - top[0]))
    return {
        "tokens": ref_tokens,
        "token_match": ref_tokens == list(tokens),
        "matching_prefix": matching_prefix(tokens, ref_tokens),
        "logits_cosine_min": round(min(cos), 6),
        "logits_max_abs_err": round(max(err), 6),
        "top2_margin_min": round(min(margins), 6),
    }
