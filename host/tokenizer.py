"""Text in and out: the tokenizer a program bundle carries (``tokenizer.json``, read by the ``tokenizers`` package).

``kvoverlay compile`` stores the ``tokenizer.json`` found beside the model (or given with ``--tokenizer``) in the
bundle, after checking it against the model's vocabulary; :class:`Tokenizer` turns text into ids and back, and
:class:`TextStream` turns a stream of ids into a stream of text pieces, holding back a piece until its bytes
form whole characters (byte-level BPE splits one character over several tokens).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TOKENIZER_FILE", "TextStream", "Tokenizer", "TokenizerError", "find_tokenizer"]

#: The file name ``kvoverlay compile`` looks for beside the model.
TOKENIZER_FILE = "tokenizer.json"
#: How far below the model's vocabulary a tokenizer's may lie: exporters pad the embedding rows to a round
#: number (Phi-3: 32,011 tokens in 32,064 rows; Qwen2.5: 151,665 in 151,936), never by a sixteenth.
_PAD_FRACTION = 1 / 16
_REPLACEMENT = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer that is missing, unreadable, or does not fit the program's vocabulary."""


def find_tokenizer(model: str | os.PathLike, given: str | os.PathLike | None = None) -> Path | None:
    """The tokenizer file for *model*: *given* (which must exist), else ``tokenizer.json`` beside it, else None."""
    if given is not None:
        path = Path(given)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"--tokenizer {given}: no such file")
        return path
    beside = Path(model).parent / TOKENIZER_FILE
    return beside if beside.is_file() else None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` checked against a program's vocabulary of *vocab* logits.

    Parameters
    ----------
    blob : bytes
        The ``tokenizer.json`` text.
    vocab : int or None
        The number of the program's logits; every id the tokenizer can produce must be below it (None: only
        read the tokenizer, as ``kvoverlay compile`` does before the model is compiled).
    where : str
        Names the tokenizer in error messages.
    """

    def __init__(self, blob: bytes, vocab: int | None, where: str = "the program's tokenizer"):
        from tokenizers import Tokenizer as HfTokenizer

        self.where = where
        try:
            self._tok = HfTokenizer.from_str(bytes(blob).decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type for bad JSON
            raise TokenizerError(f"{where}: not a tokenizer.json the tokenizers package reads"
                                 f" ({' '.join(str(exc).split())[:160]})") from None
        self.blob = bytes(blob)  # what a bundle stores
        self.size = self._tok.get_vocab_size(with_added_tokens=True)
        self.vocab = self.size
        if vocab is not None:
            self.check_vocab(vocab)

    def check_vocab(self, vocab: int) -> None:
        """Hold the tokenizer to a program's vocabulary of *vocab* logits; raises :class:`TokenizerError` if its
        size does not match."""
        if not int(vocab) * (1 - _PAD_FRACTION) <= self.size <= int(vocab):
            raise TokenizerError(f"{self.where} has {self.size} tokens, which does not match the model's vocabulary of"
                                 f" {int(vocab)}")
        self.vocab = int(vocab)

    @classmethod
    def from_file(cls, path: str | os.PathLike, vocab: int | None) -> Tokenizer:
        return cls(Path(path).read_bytes(), vocab, where=f"tokenizer {path}")

    def encode(self, text: str) -> list[int]:
        """The ids of *text* (with the special tokens the tokenizer's post-processor adds, as transformers does)."""
        ids = self._tok.encode(text).ids
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise TokenizerError(f"the text tokenizes to id {bad[0]}, outside the program's vocabulary [0, {self.vocab})")
        if not ids:
            raise TokenizerError("the text is empty after tokenization")
        return ids

    def decode(self, ids) -> str:
        """The text of *ids*; ids the tokenizer lacks (padding rows of the model) decode to nothing."""
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.size], skip_special_tokens=False)

    def stream(self) -> TextStream:
        return TextStream(self)


class TextStream:
    """Text pieces of a growing id sequence: :meth:`push` an id, get the text it completes (maybe empty).

    A piece ending in an incomplete character (the replacement character) is held back until a later id
    completes it; :meth:`flush` returns what is left at the end.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._emitted = 0  # characters of decode(ids) already returned

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith(_REPLACEMENT):
            return ""
        piece, self._emitted = text[self._emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self._emitted = text[self._emitted:], len(text)
        return piece
