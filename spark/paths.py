"""Workdir paths, local or remote (gs://BUCKET/…): every access to a run's files goes through
etils.epath (gs:// through gcsfs), so a pod job can write checkpoints, metrics, tensorboard events,
plots and the tokenizer straight to a bucket. orbax takes the same epath.Path."""

from __future__ import annotations

import os

from etils import epath


def is_remote(p) -> bool:
    return "://" in os.fspath(p)


def path(p) -> epath.Path:
    """`p` as an epath.Path: a local path made absolute, a remote one (gs://…) as given."""
    s = os.fspath(p)
    return epath.Path(s) if is_remote(s) else epath.Path(os.path.abspath(s))


def write_text_atomic(p, text: str) -> None:
    """Write a whole file so that a crash never leaves it half written: locally through a temporary
    sibling and a rename; an object store replaces an object whole on upload already (and its
    rename is a copy). Object stores cannot append: appending files are rewritten whole."""
    p = path(p)
    if is_remote(p):
        p.write_text(text)
        return
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(p)


def upload_tree(local: str, dest) -> None:
    """Copy every file under the local directory `local` to the same relative path under `dest`
    (for writers that only know local files: tensorboard events, profiler traces)."""
    import pathlib

    for f in pathlib.Path(local).rglob("*"):
        if f.is_file():
            target = path(dest) / f.relative_to(local).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
