"""Run metrics: WORKDIR/metrics.jsonl (one JSON object per logged step), tensorboard event files
(tensorboardX, no TensorFlow), a tqdm progress bar, and a PNG of the loss curves at the end.
WORKDIR may be local or gs://… (spark.paths)."""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile

import numpy as np
from tqdm import tqdm

from spark import paths


def _plain(v):
    a = np.asarray(v)
    if a.ndim == 0:
        x = a.item()
        return x if not isinstance(x, float) or math.isfinite(x) else None
    return [_plain(x) for x in a]


class MetricsWriter:
    """Writes metrics.jsonl and tensorboard. A run resumed from step N first drops what an earlier
    run logged after N (rows of metrics.jsonl; tensorboard's purge_step), so a resumed run never
    holds two rows for a step. metrics.jsonl is rewritten whole at each row (an object store
    cannot append; a run logs thousands of rows, not millions). For a remote workdir the event
    files are written locally and uploaded whole after each row (what tensorboardX's own gs://
    writer does, without its second upload when it is garbage-collected at exit)."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        root = paths.path(workdir)
        self.path, self._tb_dest = root / "metrics.jsonl", root / "tb"
        self._tb, self._lines, self._tb_local = None, [], None
        if enabled:
            from tensorboardX import SummaryWriter

            if resume_step is not None and self.path.exists():
                self._lines = [json.dumps(r) + "\n" for r in read_jsonl(self.path) if r["step"] <= resume_step]
                paths.write_text_atomic(self.path, "".join(self._lines))
            purge = None if resume_step is None else resume_step + 1
            if paths.is_remote(self._tb_dest):
                self._tb_local = tempfile.mkdtemp(prefix="tb_")
            self._tb = SummaryWriter(self._tb_local or str(self._tb_dest), purge_step=purge)

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self.enabled:
            self._lines.append(json.dumps(row) + "\n")
            paths.write_text_atomic(self.path, "".join(self._lines))
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, list):
                    for i, x in enumerate(v):
                        if isinstance(x, (int, float)):
                            self._tb.add_scalar(f"{k}/layer{i}", x, step)
            self._upload_events()
        return row

    def _upload_events(self):
        if self._tb_local is not None:
            self._tb.flush()
            paths.upload_tree(self._tb_local, self._tb_dest)

    def close(self):
        if self._tb is not None:
            self._upload_events()
            self._tb.close()
            self._tb = None
        if self._tb_local is not None:
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in paths.path(path).read_text().splitlines() if line.strip()]


def progress(total: int, initial: int, enabled: bool = True):
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")


def plot_losses(workdir: str) -> str | None:
    """loss_curves.png: training loss per granularity (mean over each log interval) and held-out
    loss per granularity, against step."""
    path = paths.path(workdir) / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({k for r in rows for k in r if k.startswith("loss_") or k.startswith("eval_loss_")})
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=key, marker="o" if key.startswith("eval") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = paths.path(workdir) / "loss_curves.png"
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out.write_bytes(png.getvalue())
    return str(out)
