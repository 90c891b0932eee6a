"""Byte-level tokenizer: ids 0..255 are bytes, then BOS, EOS, PAD. Vocabulary 259."""

from __future__ import annotations

import numpy as np

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    vocab_size = VOCAB_SIZE
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, np.uint8).astype(np.int32)
        parts = ([np.array([BOS], np.int32)] if bos else []) + [ids] + (
            [np.array([EOS], np.int32)] if eos else [])
        return np.concatenate(parts)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")
