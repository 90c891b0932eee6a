"""What every reasoning task shares: instances, splits by hash, word access to generated ids."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from spark.tasks import vocab

SPLITS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class Instance:
    prompt: str  # words, ending with "|"
    solution: str  # one valid solution's words, steps joined by " ; " (no <eos>)
    key: tuple  # the instance's identity (numbers, graph, …): its split is a hash of it


def split_of(key) -> str:
    """Disjoint splits by construction: 1/20 of all instances are validation, 1/20 test."""
    bucket = zlib.crc32(repr(key).encode()) % 20
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def instance(task, split: str, index: int, seed: int = 0) -> Instance:
    """The index-th instance of a split: deterministic, drawn until its hash falls in the split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    while True:
        inst = task.sample(rng)
        if split_of(inst.key) == split:
            return inst


def take_words(ids, partial: bool = False):
    """The steps of a generated solution as lists of words, or None if it does not end with
    <eos> (unless `partial`: whole steps so far, the unfinished last one dropped)."""
    ids = [int(t) for t in ids]
    if vocab.EOS in ids:
        ids = ids[: ids.index(vocab.EOS)]
        return vocab.steps(ids)
    if not partial:
        return None
    if vocab.DELIM not in ids:
        return []
    return vocab.steps(ids[: len(ids) - ids[::-1].index(vocab.DELIM)])
