"""Data pipeline: tfds array_record source -> grain: shuffle, tokenize, pack, this process's rows.

Batches are dicts of numpy arrays [B, T]: inputs, targets, positions, segment_ids, loss_mask.
Documents are concatenated (BOS ... EOS) and split into rows of T + 1 tokens by grain's
ConcatThenSplitIterDataset; positions restart at every document piece, segment ids keep pieces
from attending to each other, and the loss skips targets across a piece boundary and padding.
Task examples (prompt + solution, spark/tasks) are packed whole instead (FirstFitPackIterDataset,
padding the rest of a row): a solution split from its prompt would be trained on noise.
The iterator's state (`get_state`/`set_state`) is saved with each checkpoint.
"""

from __future__ import annotations

import grain
import grain.experimental as grain_exp
import numpy as np
import tensorflow_datasets as tfds

from spark import paths
from spark.config import DataConfig
from spark.data import stdlib
from spark.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from spark.errors import ConfigError


def get_tokenizer(cfg: DataConfig, workdir: str | None = None):
    """The run's tokenizer. SentencePiece: data.spm_model, else WORKDIR/tokenizer.model, trained
    on the train split (by process 0; the others wait) when it does not exist yet."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "task":
        from spark.tasks import TaskTokenizer

        return TaskTokenizer()
    path = cfg.spm_model or (str(paths.path(workdir) / "tokenizer.model") if workdir else None)
    if path is None:
        raise ConfigError("data.tokenizer='sentencepiece' needs data.spm_model or a workdir")
    if not paths.path(path).exists():
        if cfg.spm_model:
            raise ConfigError(f"SentencePiece model {path!r} not found")
        if not cfg.spm_train:
            raise ConfigError(f"this config needs a SentencePiece model and {path} does not exist: set "
                              "--config.data.spm_model=PATH (local or gs://; e.g. the Gemma tokenizer.model, "
                              "which python -m spark.convert writes into its --out workdir)")
        import jax
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            src = source(cfg, cfg.train_split)
            texts = (_text(src[i][cfg.text_key]) for i in range(len(src)))
            train_sentencepiece(texts, path, cfg.spm_vocab_size, cfg.spm_train_chars)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sentencepiece_trained")
    return SentencePieceTokenizer(path)


def _text(x) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def source(cfg: DataConfig, split: str):
    """A random-access source of examples for one split."""
    if cfg.name is None:
        raise ConfigError("this config trains on a tfds dataset you name: set --config.data.name=NAME (prepared "
                          "once with: tfds build NAME --file_format array_record), e.g. --config.data.name=c4/en")
    if cfg.name == "python_stdlib":
        return stdlib.prepare(cfg.data_dir).as_data_source(split=split)
    if _is_task(cfg):
        from spark import tasks

        return tasks.source(cfg.name, split)
    try:  # download=False: never download_and_prepare inside training (on every host; offline it hangs)
        return tfds.data_source(cfg.name, split=split, data_dir=cfg.data_dir, download=False)
    except (tfds.core.registered.DatasetNotFoundError, ValueError, FileNotFoundError, AssertionError,
            NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        builder = _unprepared_builder(cfg)
        if builder is not None:
            where = f" --data_dir {cfg.data_dir}" if cfg.data_dir else ""
            raise ConfigError(f"dataset {cfg.name!r} is not prepared in {builder.data_dir}; prepare it once with: "
                              f"tfds build {cfg.name} --file_format array_record{where}") from None
        raise ConfigError(f"cannot open dataset {cfg.name!r} split {split!r}: {first[:200]}") from None


def _unprepared_builder(cfg: DataConfig):
    """The tfds builder of a known dataset that is not prepared in data_dir, else None."""
    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    except Exception:  # noqa: BLE001 - an unknown name: the caller reports tfds' own message
        return None
    return None if builder.is_prepared() else builder


def _to_model_batch(b: dict) -> dict:
    tok, pos, seg, w = b["tokens"], b["tokens_positions"], b["tokens_segment_ids"], b["weights"]
    return {
        "inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": pos[:, :-1],
        "segment_ids": seg[:, :-1],
        "loss_mask": ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0) & (w[:, 1:] > 0)).astype(np.float32),
    }


def _is_task(cfg: DataConfig) -> bool:
    from spark import tasks

    return cfg.name in tasks.TASKS


def _fits(ex: dict, n: int) -> dict:
    if len(ex["tokens"]) > n:
        raise ConfigError(f"a task example of {len(ex['tokens'])} tokens does not fit a row of "
                          f"train.seq_len + 1 = {n}; raise train.seq_len")
    return ex


def _encode(ex, tok, key):
    """Tokens and their loss weights: a task example (prompt + solution) is trained on its
    solution and <eos> only; plain text on every token."""
    if "prompt" in ex:
        prompt = tok.encode(_text(ex["prompt"]), bos=True)
        sol = tok.encode(_text(ex["solution"]), eos=True)
        return {"tokens": np.concatenate([prompt, sol]),
                "weights": np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(sol), np.int32)])}
    ids = tok.encode(ex[key], bos=True, eos=True)
    return {"tokens": ids, "weights": np.ones(len(ids), np.int32)}


def make_dataset(cfg: DataConfig, split: str, *, seq_len: int, batch_size: int, seed: int,
                 train: bool, process_index: int = 0, process_count: int = 1, tokenizer=None) -> grain.IterDataset:
    """This process's rows [i·B/P, (i+1)·B/P) of each global batch of `batch_size` packed rows.

    Every process packs the same global stream and keeps its own rows, so the global batch (and
    hence the run) does not depend on the number of processes; the cost is that each host
    tokenizes the whole stream, which is small next to a train step for this tokenizer."""
    if batch_size % process_count:
        raise ConfigError(f"batch size {batch_size} is not divisible by {process_count} processes")
    tok = tokenizer or get_tokenizer(cfg)
    ds = grain.MapDataset.source(source(cfg, split))
    if train:
        ds = ds.shuffle(seed=seed).repeat(None)
    key = cfg.text_key
    ds = ds.map(lambda ex: _encode(ex, tok, key))
    lengths = {"tokens": seq_len + 1, "weights": seq_len + 1}
    if _is_task(cfg):
        ds = grain_exp.FirstFitPackIterDataset(ds.map(lambda ex: _fits(ex, seq_len + 1)).to_iter_dataset(),
                                               length_struct=lengths, num_packing_bins=batch_size, seed=seed,
                                               shuffle_bins=train)
    else:
        ds = grain_exp.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct=lengths)
    ds = ds.batch(batch_size, drop_remainder=True)
    rows = batch_size // process_count
    lo = process_index * rows
    return ds.map(lambda b: _to_model_batch({k: v[lo:lo + rows] for k, v in b.items()}))
