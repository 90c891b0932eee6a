"""The word-level vocabulary every reasoning task shares: a few symbols, then the numbers.

Text is space-separated words ("12 - 7 = 5 ;"); each word is one token, so a tiny model never
has to learn multi-token numbers. Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 ";" (ends a reasoning step),
then the other symbols, then "0", "1", … up to the vocabulary size.
"""

from __future__ import annotations

import numpy as np

from spark.errors import ConfigError

PAD, BOS, EOS, DELIM = 0, 1, 2, 3
SYMBOLS = ("<pad>", "<bos>", "<eos>", ";", "|", "=", "+", "-", "*", "/", ",", ">", "start", "goal", "mod", "?")
VOCAB_SIZE = 256
FIRST_NUMBER = len(SYMBOLS)
MAX_NUMBER = VOCAB_SIZE - FIRST_NUMBER - 1  # 239


class TaskTokenizer:
    """The tokenizer interface of spark.data.tokenizer over the task vocabulary."""

    vocab_size = VOCAB_SIZE
    bos_id, eos_id, pad_id, delim_id = BOS, EOS, PAD, DELIM

    def __init__(self):
        self.words = list(SYMBOLS) + [str(i) for i in range(MAX_NUMBER + 1)]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.bytes_per_id = np.array([0.0] * 3 + [float(len(w) + 1) for w in self.words[3:]], np.float32)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> np.ndarray:
        try:
            ids = [self.ids[w] for w in text.split()]
        except KeyError as e:
            raise ConfigError(f"{e.args[0]!r} is not a word of the task vocabulary (numbers 0..{MAX_NUMBER}, "
                              f"symbols {' '.join(SYMBOLS[3:])})") from None
        return np.asarray(([BOS] if bos else []) + ids + ([EOS] if eos else []), np.int32)

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) >= DELIM and int(i) < VOCAB_SIZE)


def number(tok: int) -> int | None:
    """The value of a number token, or None."""
    return tok - FIRST_NUMBER if FIRST_NUMBER <= tok < VOCAB_SIZE else None


def steps(ids) -> list[list[str]]:
    """A generated solution split into steps of words (EOS and what follows dropped; any other
    token, the padding id included, is a word — a bad one)."""
    words, out, cur = TaskTokenizer().words, [], []
    for t in ids:
        t = int(t)
        if t == EOS:
            break
        if t == DELIM:
            out.append(cur)
            cur = []
        else:
            cur.append(words[t] if 0 <= t < VOCAB_SIZE else "?")
    if cur:
        out.append(cur)
    return out
