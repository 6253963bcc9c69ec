"""Perplexity of a text under a program, as llama.cpp's perplexity tool reports it: teacher-forced mean NLL.

The text's tokens are cut into chunks of at most the program's ``--max-seq``; each chunk runs from an empty KV
cache, fed its own tokens whatever the program would have chosen, and every token after a chunk's first is
scored by the negative log-likelihood of the logits that predict it. ``nll`` is the mean over the scored
tokens (nats), ``perplexity`` its exponential. The same chunks through onnxruntime (fp32) give the reference.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .session import Session, SessionError

__all__ = ["chunks", "nll", "ort_perplexity", "perplexity"]


def nll(logits, target: int) -> float:
    """Negative log-likelihood of *target* under the softmax of *logits* (float64, log-sum-exp)."""
    x = np.asarray(logits, np.float64)
    top = float(np.max(x))
    return top + math.log(float(np.sum(np.exp(x - top)))) - float(x[int(target)])


def chunks(ids, size: int) -> list:
    """*ids* cut into pieces of *size* tokens (the last may be shorter); pieces of one token score nothing."""
    if size < 2:
        raise SessionError(f"a perplexity chunk of {size} tokens scores nothing: compile with --max-seq 2 or more")
    out = [list(ids[i:i + size]) for i in range(0, len(ids), size)]
    return [c for c in out if len(c) > 1]


def _summary(total: float, scored: int, size: int) -> dict:
    if not scored:
        raise SessionError("the text has fewer than 2 tokens: nothing to score")
    mean = total / scored
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": scored, "chunk": size}


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=None, leave=False)


def perplexity(program, ids, backend: str = "isa", *, chunk: int | None = None, **options) -> dict:
    """Teacher-forced mean NLL of *ids* under *program* on *backend*.

    Returns ``{"nll", "perplexity", "tokens", "chunk"}``: ``tokens`` counts the scored tokens.
    """
    with Session(program, backend=backend, **options) as session:
        size = min(chunk or session.max_seq, session.max_seq)
        pieces = chunks(ids, size)
        session._check_tokens([t for c in pieces for t in c])  # every id before the first step
        total, scored = 0.0, 0
        with _progress(sum(len(c) - 1 for c in pieces), f"perplexity ({backend})") as bar:
            for piece in pieces:
                session.reset()
                logits = session.teacher_forced(piece[:1], piece[1:])
                total += sum(nll(lg, t) for lg, t in zip(logits, piece[1:], strict=True))
                scored += len(piece) - 1
                bar.update(len(piece) - 1)
    return _summary(total, scored, size)


def ort_perplexity(model, ids, size: int) -> dict:
    """The same figure from fp32 onnxruntime on *model* (a path or session), chunked as :func:`perplexity` is."""
    from .reference import ort_logits

    total, scored = 0.0, 0
    for piece in chunks(ids, size):
        logits = ort_logits(model, piece)
        total += sum(nll(lg, t) for lg, t in zip(logits[:-1], piece[1:], strict=True))
        scored += len(piece) - 1
    return _summary(total, scored, size)
