"""tfds builder for the embedded default corpus: the running Python's standard library sources.

Every `.py` file under `sysconfig.get_paths()['stdlib']` (site-packages excluded), in sorted path
order; a file goes to the held-out split when crc32(relative path) % 100 < 2. Written as
array_record, so reading it needs no TensorFlow. `root=` points the builder at another tree
(tests use a small generated one).
"""

from __future__ import annotations

import os
import sysconfig
import zlib

import tensorflow_datasets as tfds

HELDOUT_PERCENT = 2


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_sources(root: str) -> list[str]:
    """Relative paths of the .py files under root, sorted, without site-packages."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return sorted(out)


def is_heldout(relpath: str) -> bool:
    return zlib.crc32(relpath.encode()) % 100 < HELDOUT_PERCENT


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """The .py files of the Python standard library, one example per file."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, root: str | None = None, **kwargs):
        self._root = root or stdlib_root()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        paths = list_sources(self._root)
        return {"train": self._generate_examples([p for p in paths if not is_heldout(p)]),
                "validation": self._generate_examples([p for p in paths if is_heldout(p)])}

    def _generate_examples(self, relpaths):
        for rel in relpaths:
            with open(os.path.join(self._root, rel), "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
            if text.strip():
                yield rel, {"text": text, "path": rel}


def prepare(data_dir: str | None, root: str | None = None) -> PythonStdlib:
    """Build the dataset once (a no-op when it already exists) and return the builder."""
    builder = PythonStdlib(data_dir=data_dir, root=root)
    builder.download_and_prepare()
    return builder
