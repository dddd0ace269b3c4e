"""The paired statistics of the study (no project imports; numpy for ranks): a mean and its standard error
over paired per-item (or per-passage) differences, stratified by task or subject; seeds combined; Spearman's rank
correlation; a least-squares line. evaluate.py scores with them, measure.py and study.py compare with them.

    from stats import paired, combine
    d = paired(model_items, stage1_items, "p")     # {"mean", "se", "n"}: mean over tasks of each task's change

A stratified mean is the mean of the stratum means (one stratum: the plain mean); its SE is
sqrt(sum_s var_s / n_s) / S with sample variances (ddof 1), a 1-item stratum borrowing the pooled variance.
Across seeds: the mean, and SE = the larger of the pooled paired SE and std / sqrt(k).
"""
import math
from collections import defaultdict

import numpy as np


# Means and variances sum left to right as Python does: numpy's pairwise summation would move the last
# digits of report.json's numbers, which a re-render must reproduce byte for byte.

def mean(xs) -> float:
    return sum(xs) / len(xs)


def _var(xs) -> float:
    """Sample variance (ddof 1); 0 for a single value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def stats(values, strata=None) -> dict:
    """{"mean", "se", "n"}: the mean of the stratum means (one stratum: the plain mean) and its standard
    error, each stratum's variance with ddof 1 (a 1-item stratum borrows the pooled variance)."""
    if not values:
        return {"mean": None, "se": None, "n": 0}
    groups = defaultdict(list)
    for v, s in zip(values, strata or [None] * len(values)):
        groups[s].append(v)
    pooled = _var(values)
    var = sum((_var(g) if len(g) > 1 else pooled) / len(g) for g in groups.values())
    S = len(groups)
    return {"mean": sum(mean(g) for g in groups.values()) / S,
            "se": math.sqrt(var) / S if len(values) > 1 else None, "n": len(values)}


def combine_independent(parts) -> dict:
    """Mean of independent estimates {"mean", "se"} and its standard error (a category from its tasks)."""
    parts = [p for p in parts if p and p["mean"] is not None]
    if not parts:
        return {"mean": None, "se": None}
    se = None if any(p["se"] is None for p in parts) else math.sqrt(sum(p["se"] ** 2 for p in parts)) / len(parts)
    return {"mean": mean([p["mean"] for p in parts]), "se": se}


def paired_diff(a_items, b_items, metric="acc", by="subject") -> dict:
    """Paired per-item difference a - b over the items both hold ({"mean", "se", "n"}), stratified by the
    item field `by`: "subject" within a task (like its score), "task" for a mean over tasks. Items pair by
    (task, id) and must carry the same prompt key."""
    b = {(r["task"], r["id"]): r for r in b_items}
    diffs, strata = [], []
    for r in a_items:
        o = b.get((r["task"], r["id"]))
        if o is None or metric not in r or metric not in o:
            continue
        if o["key"] != r["key"]:
            raise ValueError(f"task {r['task']} item {r['id']} has a different prompt in the baseline; paired "
                             f"differences need both runs on the same items, shots and format.")
        diffs.append(r[metric] - o[metric])
        strata.append(r.get(by))
    return stats(diffs, strata)


def paired(a_items, b_items, metric: str) -> dict:
    """a - b per item, stratified by task: the mean over tasks of each task's mean change, and its SE."""
    return paired_diff(a_items, b_items, metric, by="task")


def combine(parts) -> dict:
    """Mean over seeds; SE = the larger of the pooled paired SE and the seed spread std / sqrt(k)."""
    parts = [p for p in parts if p and p.get("mean") is not None]
    if not parts:
        return {"mean": None, "se": None, "std": None, "k": 0}
    k = len(parts)
    m, std = spread([p["mean"] for p in parts])
    se = math.sqrt(sum((p["se"] or 0) ** 2 for p in parts)) / k
    return {"mean": m, "se": max(se, std / math.sqrt(k)) if std is not None else se, "std": std, "k": k}


def spread(vs) -> tuple:
    """(mean, sample std or None) of plain numbers."""
    return mean(vs), math.sqrt(_var(vs)) if len(vs) > 1 else None


def ranks(v) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    v = np.asarray(v, dtype=float)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)                       # the rank of each distinct value's last copy
    return ((upper - (counts - 1) / 2)[inverse]).astype(float)


def spearman(x, y):
    """Spearman's rank correlation (ties get their mean rank); None below 3 points or without spread. Ranks
    are multiples of 1/2, so these sums are exact in any order."""
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    return float(dx @ dy) / math.sqrt(sxx * syy) if sxx and syy else None


def fit_line(xs, ys) -> dict:
    """Least squares y = a + b x: {"intercept", "slope", "r2", "n"} (None values below 2 distinct x)."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return {"intercept": None, "slope": None, "r2": None, "n": n}
    mx, my = mean(xs), mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    syy = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / syy if syy else None
    return {"intercept": a, "slope": b, "r2": r2, "n": n}
