"""Confidence calibration: temperature scaling fitted on validation logits, ECE, risk-coverage."""

from __future__ import annotations

import numpy as np
import torch


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimizing validation NLL of softmax(logits / T) (Guo et al., 2017)."""
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

    energy: -logsumexp(logits) (Liu et al., 2020); max-logit: -max(logits) (Hendrycks et al., 2022).
    """
    z = np.asarray(logits, dtype=np.float64)
    if method == "energy":
        m = z.max(axis=1)
        return -(m + np.log(np.exp(z - m[:, None]).sum(axis=1)))
    if method == "max-logit":
        return -z.max(axis=1)
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
