"""notebooks/ablations.ipynb runs end to end (nbclient, a few training steps), so it cannot rot."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ablation_notebook_executes(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("ABLATION_STEPS", "4")
    monkeypatch.setenv("ABLATION_LAYERS", "1")
    monkeypatch.setenv("ABLATION_DATA_DIR", data_dir)
    monkeypatch.setenv("ABLATION_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "ablations.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "acceptance" in outputs and "mix: ends full" in outputs and "keys per query" in outputs
    for name in ("dense", "spark", "spark+matformer"):
        assert os.path.exists(tmp_path / "runs" / name / "metrics.jsonl")
