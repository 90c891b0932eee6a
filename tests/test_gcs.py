"""gs:// workdirs, for real as far as this machine goes: a Cloud Storage emulator
(gcp-storage-emulator, in memory) started by the test, with every client pointed at it —
etils.epath/gcsfs (STORAGE_EMULATOR_HOST), orbax's tensorstore (TENSORSTORE_GCS_HTTP_URL) and
tensorboardX's google-cloud-storage writer. A training run, its resume, sampling's checkpoint
load and a SentencePiece model all live in the bucket; nothing lands on local disk."""

import json
import logging
import os
import socket

import pytest
from test_checkpoint import tiny_run

BUCKET = "spark-test"


def _send_generation_on_download(objects):
    """Real GCS answers a media GET with its generation (x-goog-generation); the emulator does not,
    so tensorstore reads generation 0 and a later conditional write of the OCDBT manifest fails
    now and then ("Malformed StorageGeneration"). Add the header the real service sends."""
    download = objects.download

    def with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
        except Exception:  # noqa: BLE001 - not found: the emulator's own 404 follows
            pass
        return download(request, response, storage, *args, **kwargs)

    return with_generation


@pytest.fixture(scope="module")
def gcs():
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "could not determine bucket type": no credentials
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(objects, "download", _send_generation_on_download(objects))
        mp.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs and google-cloud-storage
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's array writes
        mp.setenv("GCE_METADATA_ROOT", f"127.0.0.1:{port}")  # tensorstore's credential probe: answered at once
        yield f"gs://{BUCKET}"
    server.stop()


def _ls(p):
    from etils import epath

    return sorted(x.name for x in epath.Path(p).iterdir())


def test_training_run_and_resume_in_a_bucket(gcs, data_dir, tmp_path, monkeypatch, capsys):
    from etils import epath

    from spark.metrics import read_jsonl
    from spark.train import load_checkpoint, run

    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here as ./gs:/…
    work = f"{gcs}/runs/tiny"
    run(tiny_run(data_dir, 3, ckpt_every=2), work, progress=False)
    assert {"checkpoints", "config.json", "metrics.jsonl", "tb", "loss_curves.png"} <= set(_ls(work))
    assert _ls(f"{work}/checkpoints") == ["2", "3"]
    assert any(n.startswith("events.out.tfevents") and epath.Path(f"{work}/tb/{n}").stat().length > 0
               for n in _ls(f"{work}/tb"))
    assert epath.Path(f"{work}/loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(epath.Path(f"{work}/config.json").read_text())["train"]["steps"] == 3
    epath.Path(f"{work}/checkpoints/3").rmtree()  # as if step 3 never reached the bucket: row 3 is retrained
    run(tiny_run(data_dir, 5, ckpt_every=2), work, progress=False)
    assert "resuming from step 2" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(f"{work}/metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert _ls(f"{work}/checkpoints") == ["4", "5"]
    cfg, params, step = load_checkpoint(work)
    assert step == 5 and cfg.train.steps == 5
    assert os.listdir(tmp_path) == []


def test_sentencepiece_model_in_a_bucket(gcs, tmp_path, monkeypatch):
    from spark.config import DataConfig
    from spark.data.pipeline import get_tokenizer
    from spark.data.tokenizer import train_sentencepiece

    monkeypatch.chdir(tmp_path)
    text = ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n"] * 50
    path = train_sentencepiece(text, f"{gcs}/tok/spm.model", vocab_size=300)
    tok = get_tokenizer(DataConfig(tokenizer="sentencepiece", spm_model=path))
    assert tok.vocab_size == 300 and tok.decode(tok.encode("print(x)")) == "print(x)"
    with pytest.raises(Exception, match="not found"):
        get_tokenizer(DataConfig(tokenizer="sentencepiece", spm_model=f"{gcs}/tok/missing.model"))
    assert os.listdir(tmp_path) == []
