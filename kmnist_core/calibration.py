"""Confidence calibration: temperature scaling fitted on validation logits, ECE, risk-coverage, and the
Clopper-Pearson bounds the review promise and the audit of a run are stated with.

torch is imported only where a temperature is fitted: `status` and `report` use the bounds and must
not pay torch's start-up."""

from __future__ import annotations

import math

import numpy as np

from kmnist_core.policy import accepted, out_of_set


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimizing validation NLL of softmax(logits / T) (Guo et al., 2017)."""
    import torch

    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def ood_score(logits: np.ndarray, method: str = "energy") -> np.ndarray:
    """Out-of-set score from raw logits, higher = less like any class.

    energy: -logsumexp(logits) (Liu et al., 2020); max-logit: -max(logits) (Hendrycks et al., 2022);
    max-softmax: -max softmax probability (Hendrycks & Gimpel, 2017). All on raw (T = 1) logits.
    """
    z = np.asarray(logits, dtype=np.float64)
    if method == "energy":
        m = z.max(axis=1)
        return -(m + np.log(np.exp(z - m[:, None]).sum(axis=1)))
    if method == "max-logit":
        return -z.max(axis=1)
    if method == "max-softmax":
        return -softmax(z).max(axis=1)
    raise ValueError(f"unknown out-of-set score {method!r}")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict]:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            rows.append({"lo": float(lo), "hi": float(hi), "count": int(in_bin.sum()),
                         "confidence": float(conf[in_bin].mean()), "accuracy": float(correct[in_bin].mean())})
    return rows


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Accept crops in order of falling confidence: precision of the accepted set vs the share accepted."""
    conf = probs.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    correct = (probs.argmax(axis=1) == labels)[order]
    n = np.arange(1, len(order) + 1)
    return {"threshold": conf[order], "coverage": n / len(order), "precision": np.cumsum(correct) / n}


def threshold_for_precision(probs: np.ndarray, labels: np.ndarray, target: float) -> tuple[float, float]:
    """Lowest confidence threshold whose accepted set keeps `target` precision, and the coverage it gives.

    Returns (1.0, 0.0) if no non-empty set reaches the target.
    """
    rc = risk_coverage(probs, labels)
    ok = np.flatnonzero(rc["precision"] >= target)
    if len(ok) == 0:
        return 1.0, 0.0
    i = ok[-1]
    return float(rc["threshold"][i]), float(rc["coverage"][i])


def risk_coverage_table(probs: np.ndarray, labels: np.ndarray, targets=(0.99, 0.995, 0.999)) -> list[dict]:
    return [{"precision_target": t, **dict(zip(("threshold", "coverage"), threshold_for_precision(probs, labels, t)))}
            for t in targets]


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly in log space (no scipy needed)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(0, min(k, n) + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def precision_lower_bound(errors: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound of a precision measured as (n - errors) / n.

    The true error rate e is below the q solving P(X <= errors | n, q) = 1 - confidence, so precision
    is above 1 - q with that confidence. Solved by bisection (binomial_cdf falls as q grows).
    """
    if n == 0:
        return 0.0
    alpha = 1.0 - confidence
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if binomial_cdf(errors, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return 1.0 - hi


def rate_upper_bound(hits: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate measured as hits / n."""
    return 1.0 - precision_lower_bound(hits, n, confidence)


def threshold_with_bound(confidence: np.ndarray, correct: np.ndarray, target: float,
                         level: float = 0.95) -> dict:
    """The lowest confidence threshold whose accepted set has a `level` lower bound of precision >= target.

    Crops are accepted in order of falling confidence. Within a run of accepted crops with the same number
    of errors, the bound only grows with the run, so only the last crop before each new error is checked.
    Returns threshold (1.0 + tiny when nothing qualifies: accept nothing), coverage, accepted, errors,
    measured precision and its bound.
    """
    order = np.argsort(-confidence, kind="stable")
    conf, ok = confidence[order], correct[order].astype(bool)
    errors_so_far = np.cumsum(~ok)
    best = {"threshold": float(np.nextafter(1.0, 2.0)), "coverage": 0.0, "accepted": 0, "errors": 0,
            "precision": float("nan"), "precision_lower_bound": 0.0}
    # Candidate ends: the last index before each error, and the very end; a cut must not split tied scores.
    ends = [i - 1 for i in np.flatnonzero(~ok) if i > 0] + [len(ok) - 1]
    for end in ends:
        while end >= 0 and end + 1 < len(conf) and conf[end + 1] == conf[end]:
            end -= 1  # a threshold cannot split crops with equal confidence: drop the whole tie
        if end < 0:
            continue
        n, e = end + 1, int(errors_so_far[end])
        if 1 - e / n < target or n <= best["accepted"]:
            continue  # a lower bound never exceeds the measured precision: this set cannot qualify or win
        bound = precision_lower_bound(e, n, level)
        if bound >= target and n > best["accepted"]:
            best = {"threshold": float(conf[end]), "coverage": float(n / len(conf)), "accepted": int(n), "errors": e,
                    "precision": float(1 - e / n), "precision_lower_bound": bound}
    return best


OOD_SCORES = ("energy", "max-softmax", "max-logit")


def fit_review(val_logits: np.ndarray, val_labels: np.ndarray, neg_logits: np.ndarray, temperature: float,
               target: float, in_set_keep: float, level: float = 0.95) -> dict:
    """The out-of-set score, both review thresholds from validation, and the promise they make.

    ood_score: of OOD_SCORES, the one that best separates validation characters from validation
    negatives (AUROC); which one wins depends on how the model was trained (with outlier exposure's
    uniform targets, max-softmax; without, the three are close).
    ood_threshold: the `in_set_keep` quantile of the in-set validation scores (so about 1 - in_set_keep
    of real characters are sent to review as unknown). review_below: among the in-set crops that pass,
    the lowest confidence whose accepted set has a one-sided `level` Clopper-Pearson lower bound of
    precision >= `target`. Validation negatives (never trained on) measure what still slips through.
    """
    aurocs = {m: auroc(ood_score(val_logits, m), ood_score(neg_logits, m)) for m in OOD_SCORES}
    method = max(aurocs, key=aurocs.get)
    fitted = fit_thresholds(val_logits, val_labels, temperature, method, target, in_set_keep, level)
    s_out = ood_score(neg_logits, method)
    neg_accepted = accepted(out_of_set(s_out, fitted["ood_threshold"]), softmax(neg_logits, temperature).max(1),
                            fitted["review_below"])  # as predict decides (kmnist_core/policy.py)
    fitted["review_promise"].update({
        "negatives_n": int(len(neg_logits)), "negatives_accepted_share": float(neg_accepted.mean()),
        "negatives_accepted_upper_bound": rate_upper_bound(int(neg_accepted.sum()), len(neg_logits), level)})
    return {"ood_score": method, "ood_score_val_auroc": aurocs, **fitted}


def fit_thresholds(val_logits: np.ndarray, val_labels: np.ndarray, temperature: float, method: str, target: float,
                   in_set_keep: float, level: float = 0.95) -> dict:
    """Both review thresholds for a given out-of-set score, from validation characters alone (see
    fit_review). Also used to refit them on another runtime's logits (int8) without the negatives."""
    s_in = ood_score(val_logits, method)
    ood_threshold = float(np.quantile(s_in, in_set_keep, method="higher"))
    known = s_in <= ood_threshold
    probs = softmax(val_logits[known], temperature)
    review = threshold_with_bound(probs.max(1), probs.argmax(1) == val_labels[known], target, level)
    in_accepted = int(review["accepted"])
    return {
        "ood_threshold": ood_threshold,
        "review_below": review["threshold"],
        "review_promise": {
            "target_precision": target, "confidence_level": level,
            "precision_lower_bound": review["precision_lower_bound"], "precision_measured": review["precision"],
            "accepted": in_accepted, "errors": review["errors"], "n": int(len(val_labels)),
            "auto_accepted_share": in_accepted / len(val_labels), "in_set_keep": in_set_keep,
        },
    }


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(an out-of-set score > an in-set score), ties counting half (Mann-Whitney)."""
    both = np.concatenate([in_scores, out_scores])
    ranks = np.empty(len(both))
    order = np.argsort(both, kind="stable")
    ranks[order] = np.arange(1, len(both) + 1)
    for value in np.unique(both[np.diff(np.sort(both), prepend=np.nan) == 0]):  # average tied ranks
        tie = both == value
        ranks[tie] = ranks[tie].mean()
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))
