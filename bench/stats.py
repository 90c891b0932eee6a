"""Statistics for bench/reasoning.py: bootstrap confidence intervals over problems, a paired
bootstrap comparison of two methods on the same problems, and AUROC (rank-based, ties halved)."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(x_PS, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Mean of per-problem values (averaged over seeds, axis 1) with a percentile bootstrap CI
    over problems -> (mean, lo, hi)."""
    x = np.asarray(x_PS, float).reshape(len(x_PS), -1).mean(axis=1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(axis=1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_bootstrap(a_PS, b_PS, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """a − b on the same problems (seeds averaged): mean difference, CI, and the one-sided
    bootstrap p-value for a <= b (the share of resampled differences <= 0)."""
    a = np.asarray(a_PS, float).reshape(len(a_PS), -1).mean(axis=1)
    b = np.asarray(b_PS, float).reshape(len(b_PS), -1).mean(axis=1)
    d = a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    q = (1 - level) / 2
    return {"diff": float(d.mean()), "lo": float(np.quantile(means, q)), "hi": float(np.quantile(means, 1 - q)),
            "p_a_not_better": float(np.mean(means <= 0))}


def auroc(score, label) -> float | None:
    """P(score of a positive > score of a negative), ties count half; None without both classes."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(allv))
    r[order] = ranks
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
