"""Metrics: verification (10-fold accuracy, ROC, EER, TMR at fixed FMR), grouped accuracy.

Verification conventions (higher score = more likely the same person; "accept" = score >= t):
- FMR(t)  = share of different-person pairs accepted; TMR(t) = share of same-person pairs
  accepted; FNMR = 1 - TMR. The ROC is evaluated at every distinct score and at +inf (accept
  nothing), so it is exact, with no threshold grid.
- EER = min over t of max(FMR(t), FNMR(t)): the smallest error rate that both kinds of error stay
  under at once; where the two curves cross it is their common value.
- TMR@FMR=f = the largest TMR among thresholds with FMR <= f. With fewer than 1/f
  different-person pairs only FMR = 0 meets the bound; summaries say so (`resolvable`).
- 10-fold accuracy follows insightface's verification.py: the threshold with the best accuracy
  on the other nine folds is applied to the held-out fold, and the mean and (population, ddof=0)
  std of the ten fold accuracies are reported. Candidate thresholds are the training folds'
  distinct scores plus +inf; ties go to the smallest threshold. Folds are the data set's own
  (`folds`, one id per pair: see runtime.eval.pairs) or, without them, contiguous blocks of pairs
  (sklearn KFold without shuffling: the first n % k folds get one pair more), as for a .bin.
- Decision accuracy: the share of pairs whose parsed yes/no answer is right; an answer that says
  neither counts as wrong. No threshold is chosen: this is the figure the papers report.
- Across groups (RFW's races): the mean and the population std (ddof=0) of the per-group figures.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, y


def contiguous_folds(n: int, k: int = 10) -> np.ndarray:
    """Fold id per pair for contiguous folds, as sklearn's KFold(n_splits=k, shuffle=False)."""
    if n < k:
        raise ValueError(f"{k}-fold needs at least {k} pairs, got {n}")
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return np.repeat(np.arange(k), sizes)


def _fold_ids(n: int, folds, k: int) -> np.ndarray:
    if folds is None:
        return contiguous_folds(n, k)
    f = np.asarray(folds, dtype=np.int64).reshape(-1)
    if f.size != n:
        raise ValueError(f"{f.size} fold ids for {n} pairs")
    if set(f.tolist()) != set(range(k)):
        missing = sorted(set(range(k)) - set(f.tolist()))
        raise ValueError(f"the pairs must cover folds 0..{k - 1} (fold ids {sorted(set(f.tolist()))[:12]}, "
                         f"missing {missing})")
    return f


def accept_accuracy(scores, labels, threshold: float) -> float:
    s, y = _check(scores, labels)
    return float(np.mean((s >= threshold) == y))


def best_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of `score >= threshold`; smallest on ties."""
    s, y = _check(scores, labels)
    candidates = np.append(np.unique(s), np.inf)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    accepted_same = pos.size - np.searchsorted(pos, candidates, side="left")  # same pairs with s >= t
    rejected_diff = np.searchsorted(neg, candidates, side="left")  # different pairs with s < t
    acc = (accepted_same + rejected_diff) / s.size
    best = int(np.argmax(acc))
    return float(candidates[best]), float(acc[best])


def ten_fold_accuracy(scores, labels, k: int = 10, folds=None) -> dict:
    """Threshold tuned on the other folds, applied to each fold (see the module docstring)."""
    s, y = _check(scores, labels)
    ids = _fold_ids(s.size, folds, k)
    accs, thresholds = [], []
    for f in range(k):
        test = ids == f
        t, _ = best_threshold(s[~test], y[~test])
        thresholds.append(t)
        accs.append(accept_accuracy(s[test], y[test], t))
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "folds": accs, "thresholds": thresholds}


def decision_correct(decisions, labels) -> np.ndarray:
    """Per pair: the answer (True yes, False no, None neither) is right; neither is wrong."""
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if len(decisions) != y.size:
        raise ValueError(f"{len(decisions)} decisions for {y.size} labels")
    return np.array([d is not None and bool(d) == bool(t) for d, t in zip(decisions, y)], dtype=bool)


def fold_accuracy_of_decisions(decisions, labels, k: int = 10, folds=None) -> dict:
    """Mean and std over the folds of the answers' accuracy (no threshold to choose)."""
    right = decision_correct(decisions, labels)
    ids = _fold_ids(right.size, folds, k)
    accs = [float(np.mean(right[ids == f])) for f in range(k)]
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "folds": accs}


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fmr, tmr, thresholds), thresholds from +inf down to the smallest score."""
    s, y = _check(scores, labels)
    if y.all() or not y.any():
        raise ValueError("a ROC needs both same-person and different-person pairs")
    thresholds = np.append(np.inf, np.unique(s)[::-1])
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    tmr = (pos.size - np.searchsorted(pos, thresholds, side="left")) / pos.size
    fmr = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    return fmr, tmr, thresholds


def equal_error_rate(scores, labels) -> tuple[float, float]:
    """(EER, threshold) with EER = min_t max(FMR(t), FNMR(t))."""
    fmr, tmr, thresholds = roc_curve(scores, labels)
    worst = np.maximum(fmr, 1.0 - tmr)
    i = int(np.argmin(worst))
    return float(worst[i]), float(thresholds[i])


def tmr_at_fmr(scores, labels, target: float) -> dict:
    fmr, tmr, thresholds = roc_curve(scores, labels)
    ok = fmr <= target
    i = int(np.flatnonzero(ok)[np.argmax(tmr[ok])])  # the +inf threshold always qualifies
    n_diff = int(np.sum(~np.asarray(labels, dtype=bool)))
    return {"fmr_target": target, "tmr": float(tmr[i]), "fmr": float(fmr[i]), "threshold": float(thresholds[i]),
            "resolvable": n_diff * target >= 1.0}


def verification_metrics(labels, scores=None, decisions=None, folds=None, fmr_targets=(1e-3, 1e-4),
                         k: int = 10) -> dict:
    """Everything the verify summary reports for one pair set. `decisions`: the parsed answers
    (True / False / None); `scores`: P(yes) or a similarity (None where the backend gave none).
    Parts the data cannot support are None, with the reason in `notes`."""
    y = np.asarray(labels, dtype=bool).reshape(-1)
    out: dict = {"pairs": int(y.size), "same": int(y.sum()), "different": int((~y).sum()), "notes": []}
    try:
        ids = _fold_ids(y.size, folds, k)
    except ValueError as e:  # too few pairs, or a --limit that left folds out
        ids = None
        out["notes"].append(f"no per-fold figures: {e}")
    if decisions is not None:
        right = decision_correct(decisions, y)
        out["decision_accuracy"] = float(right.mean()) if right.size else None
        out["answers_neither"] = sum(1 for d in decisions if d is None)
        out["decision_folds"] = fold_accuracy_of_decisions(decisions, y, k, ids) if ids is not None else None
    if scores is None:
        out["threshold_ten_fold"] = out["eer"] = out["tmr_at_fmr"] = None
        out["notes"].append("no scores: threshold-tuned accuracy, EER and TMR need first-token probabilities")
        return out
    s, y = _check(scores, y)
    out["threshold_ten_fold"] = ten_fold_accuracy(s, y, k, ids) if ids is not None else None
    if y.all() or not y.any():
        out["eer"] = out["tmr_at_fmr"] = None
        out["notes"].append("EER and TMR need both same-person and different-person pairs")
        return out
    eer, t = equal_error_rate(s, y)
    out["eer"] = {"eer": eer, "threshold": t}
    out["tmr_at_fmr"] = {f"{f:g}": tmr_at_fmr(s, y, f) for f in fmr_targets}
    return out


def across_groups(per_group: dict[str, dict], keys: tuple[str, ...]) -> dict:
    """Mean and population std across groups of each figure in `keys` (a dotted path into the
    per-group metrics, e.g. "threshold_ten_fold.mean"); groups lacking it are left out."""
    out = {}
    for key in keys:
        values = []
        for m in per_group.values():
            v = m
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            if v is not None:
                values.append(float(v))
        out[key] = ({"mean": float(np.mean(values)), "std": float(np.std(values)), "groups": len(values)}
                    if values else None)
    return out


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path, title: str,
             fmr_marks=(1e-3, 1e-4)) -> None:
    """ROC (TMR against FMR on a log axis) as a PNG; FMR = 0 points sit at the axis' left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    smallest = [f[f > 0].min() / 2 for f, _ in curves.values() if np.any(f > 0)]
    floor = min([min(fmr_marks) / 10] + smallest)
    for label, (fmr, tmr) in curves.items():
        ax.plot(np.maximum(fmr, floor), tmr, label=label)
    for m in fmr_marks:
        ax.axvline(m, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false match rate (FMR)")
    ax.set_ylabel("true match rate (TMR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grouped_accuracy(records: list[dict], key: str) -> dict[str, dict]:
    """{group: {correct, total, accuracy}} over records carrying `key` and a bool `correct`."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        c = counts[str(r[key])]
        c[0] += bool(r["correct"])
        c[1] += 1
    return {g: {"correct": c, "total": t, "accuracy": c / t} for g, (c, t) in sorted(counts.items())}


def attribute_accuracy(labels: np.ndarray, probs: np.ndarray, names) -> dict:
    """Per-attribute accuracy of `prob >= 0.5` against 0/1 labels [N, A], and their mean."""
    labels = np.asarray(labels, dtype=bool)
    predicted = np.asarray(probs, dtype=np.float64) >= 0.5
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    per = (predicted == labels).mean(axis=0)
    return {"mean": float(per.mean()), "per_attribute": {n: float(a) for n, a in zip(names, per)}}
