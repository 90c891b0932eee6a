"""Tokenizers: byte-level (default) and SentencePiece trained on the corpus.

Both expose encode(text, bos, eos) -> int32 array, decode(ids) -> str, vocab_size, bos_id,
eos_id, pad_id and bytes_per_id (UTF-8 bytes each id stands for; bits per byte divides by them).
"""

from __future__ import annotations

import io

import numpy as np

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def _with_specials(ids: np.ndarray, bos_id: int, eos_id: int, bos: bool, eos: bool) -> np.ndarray:
    parts = ([np.array([bos_id], np.int32)] if bos else []) + [ids.astype(np.int32)] + (
        [np.array([eos_id], np.int32)] if eos else [])
    return np.concatenate(parts)


class ByteTokenizer:
    """Ids 0..255 are bytes, then BOS, EOS, PAD. Vocabulary 259."""

    vocab_size = VOCAB_SIZE
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def __init__(self):
        self.bytes_per_id = np.array([1.0] * 256 + [0.0] * 3, np.float32)

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return _with_specials(np.frombuffer(data, np.uint8), BOS, EOS, bos, eos)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model (unk 0, bos 1, eos 2, pad 3; byte fallback, so nothing is unknown)."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        from spark import paths

        self.path = model_path  # local or gs://…: read through epath
        self.sp = spm.SentencePieceProcessor(model_proto=paths.path(model_path).read_bytes())
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        sizes = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                sizes.append(0.0)
            elif self.sp.is_byte(i):
                sizes.append(1.0)
            else:
                sizes.append(float(len(piece.replace("\u2581", " ").encode("utf-8"))))
        self.bytes_per_id = np.array(sizes, np.float32)

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return _with_specials(np.array(self.sp.encode(text), np.int32), self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.pad_id])


def train_sentencepiece(texts, model_path: str, vocab_size: int, max_chars: int = 5_000_000) -> str:
    """Train a BPE SentencePiece model on an iterable of strings; writes model_path (local or gs://)."""
    import sentencepiece as spm

    from spark import paths

    def lines():
        total = 0
        for t in texts:
            for line in t.splitlines():
                if line.strip():
                    total += len(line)
                    yield line
            if total >= max_chars:
                return

    model = io.BytesIO()
    try:  # rare characters fall back to their UTF-8 bytes (256 byte pieces are in the vocabulary)
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            character_coverage=0.9995, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            remove_extra_whitespaces=False, split_digits=True, max_sentence_length=1 << 16,
            num_threads=2, minloglevel=2)
    except RuntimeError as e:
        from spark.errors import ConfigError

        raise ConfigError(f"SentencePiece training failed: {str(e).strip().splitlines()[0]}") from None
    out = paths.path(model_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return model_path
