"""onnxruntime as the reference: greedy decoding and teacher-forced logits of an optimum-style decoder."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["compare", "matching_prefix", "ort_decode"]


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
    past = {n: i for n, i in names.items() if n.startswith("past_key_values")}
    outs = ["logits"] + [n.replace("past_key_values", "present") for n in past]
    cache = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for n, i in past.items()}
    ids = np.asarray(prompt, np.int64).reshape(1, -1)
    pos = 0
    tokens, logits = [], []
    for step in range(new_tokens):
        seq = ids.shape[1]
        feed = {"input_ids": ids, **cache}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((1, pos + seq), np.int64)
        if "position_ids" in names:
            feed["position_ids"] = np.arange(pos, pos + seq, dtype=np.int64).reshape(1, -1)
        res = sess.run(outs, feed)
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
