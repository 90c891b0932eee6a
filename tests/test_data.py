"""Data: the stdlib builder is deterministic with disjoint splits; a named tfds dataset (mocked)
goes through the same grain packing pipeline."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from spark.config import DataConfig
from spark.data import stdlib
from spark.data.pipeline import make_dataset
from spark.data.tokenizer import BOS, EOS, ByteTokenizer
from spark.errors import ConfigError


def _fake_root(tmp_path):
    root = tmp_path / "lib"
    for i in range(60):
        d = root / f"pkg{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (i % 5 + 1))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skip.py").write_text("x = 1\n")
    return str(root)


def _examples(builder, split):
    src = builder.as_data_source(split=split)
    return [(src[i]["path"], src[i]["text"]) for i in range(len(src))]


def test_stdlib_builder_is_deterministic_and_splits_are_disjoint(tmp_path):
    root = _fake_root(tmp_path)
    a = stdlib.prepare(str(tmp_path / "a"), root=root)
    b = stdlib.prepare(str(tmp_path / "b"), root=root)
    for split in ("train", "validation"):
        assert _examples(a, split) == _examples(b, split)
    train = {p for p, _ in _examples(a, "train")}
    held = {p for p, _ in _examples(a, "validation")}
    assert not train & held
    assert train | held == {p.encode() for p in stdlib.list_sources(root)}
    assert all(b"site-packages" not in p for p in train | held)
    assert held == {p.encode() for p in stdlib.list_sources(root) if stdlib.is_heldout(p)}


def test_real_stdlib_listing_is_large_and_skips_site_packages():
    paths = stdlib.list_sources(stdlib.stdlib_root())
    assert len(paths) > 500 and "os.py" in paths
    assert not any(p.startswith("site-packages") for p in paths)


def test_named_tfds_dataset_with_mock_data_gives_packed_batches():
    with tfds.testing.mock_data(num_examples=20):
        ds = make_dataset(DataConfig(name="lm1b"), "train", seq_len=24, batch_size=4, seed=0, train=True)
        it = iter(ds)
        batches = [next(it) for _ in range(3)]
    for b in batches:
        assert set(b) == {"inputs", "targets", "positions", "segment_ids", "loss_mask"}
        assert all(v.shape == (4, 24) for v in b.values())
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        # a target across a document boundary is not trained on
        boundary = b["segment_ids"][:, 1:] != b["segment_ids"][:, :-1]
        assert np.all(b["loss_mask"][:, :-1][boundary] == 0)


def test_pipeline_shards_processes_disjointly_and_resumes(tmp_path):
    root = _fake_root(tmp_path)
    stdlib.prepare(str(tmp_path / "d"), root=root)
    cfg = DataConfig(data_dir=str(tmp_path / "d"))
    kw = dict(seq_len=16, batch_size=4, seed=3, train=True)
    p0 = next(iter(make_dataset(cfg, "train", process_index=0, process_count=2, **kw)))
    p1 = next(iter(make_dataset(cfg, "train", process_index=1, process_count=2, **kw)))
    assert p0["inputs"].shape == (2, 16) and not np.array_equal(p0["inputs"], p1["inputs"])
    it = iter(make_dataset(cfg, "train", **kw))
    next(it)
    state = it.get_state()
    want = [next(it)["inputs"] for _ in range(3)]
    it2 = iter(make_dataset(cfg, "train", **kw))
    it2.set_state(state)
    got = [next(it2)["inputs"] for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ∑", bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and tok.decode(ids) == "héllo ∑"


@pytest.mark.parametrize("name", ["gemma2_2b", "spark_gemma2_2b"])
def test_pod_configs_load_without_data_and_name_the_flags_when_built(name, tmp_path):
    """The 2B configs load (bench/aot_compile.py needs no data) and stop at the tokenizer / the
    pipeline with one line that names the flag to set."""
    import os

    from spark.cli import load_config_file
    from spark.data.pipeline import get_tokenizer, source

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config_file(os.path.join(root, "configs", f"{name}.py"))
    assert cfg.data.tokenizer == "sentencepiece" and cfg.model.vocab_size == 256_000
    with pytest.raises(ConfigError, match=r"set --config.data.spm_model=PATH") as e:
        get_tokenizer(cfg.data, str(tmp_path))
    assert "\n" not in str(e.value) and os.listdir(tmp_path) == []  # nothing trained in its place
    with pytest.raises(ConfigError, match=r"set --config.data.name=NAME") as e:
        source(cfg.data, cfg.data.train_split)
    assert "\n" not in str(e.value)
