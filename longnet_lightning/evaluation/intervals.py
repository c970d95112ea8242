"""Bootstrap intervals over documents for perplexities and their paired differences.

Tokens of one document are not independent draws (a file that is hard to predict is hard
everywhere), so the unit of resampling is the document: a resample draws ``n`` of the ``n``
scored documents with replacement and recomputes perplexity as ``exp(sum NLL / sum targets)``
over the drawn documents (a ratio estimator, so long documents weigh by their tokens, as in the
point estimate). Paired differences resample the *same* documents for both sides of a
comparison (two context lengths of one model, or two models at one length), so what is shared
between them cancels and the interval is that of the difference itself.

Intervals are percentile intervals of ``resamples`` draws from a seeded generator: the same
report always gives the same numbers. All functions are pure; :func:`add_intervals` fills a
report dict (``results.json``) from its per-document sums.
"""
from __future__ import annotations

import itertools

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


def resample_weights(n_docs: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """float64 ``[resamples, n_docs]``: how often each document is drawn in each resample."""
    if n_docs < 1:
        raise ValueError("a bootstrap needs at least one document")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=resamples).astype(np.float64)


def resampled_perplexity(nll: np.ndarray, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[resamples]`` perplexities ``exp(w @ nll / w @ tokens)`` (nan where a draw scores nothing)."""
    num, den = weights @ np.asarray(nll, np.float64), weights @ np.asarray(tokens, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.exp(num / den)


def percentile_interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` interval of the finite draws."""
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def perplexity_interval(nll, tokens, weights, confidence: float = CONFIDENCE) -> dict:
    """Perplexity with its bootstrap interval: ``{"estimate", "low", "high"}``."""
    nll, tokens = np.asarray(nll, np.float64), np.asarray(tokens, np.float64)
    estimate = float(np.exp(nll.sum() / tokens.sum())) if tokens.sum() else float("nan")
    lo, hi = percentile_interval(resampled_perplexity(nll, tokens, weights), confidence)
    return {"estimate": estimate, "low": lo, "high": hi}


def relative_difference(a: tuple, b: tuple, weights: np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """``ppl(b) / ppl(a) - 1`` in percent, paired over the same documents, with its interval.

    ``a``, ``b``: ``(document_nll, document_tokens)`` of the two sides, documents in one order.
    Negative: ``b`` predicts better. ``excludes_zero``: the interval lies on one side of 0.
    """
    (na, ta), (nb, tb) = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in (a, b)]
    if na.shape != nb.shape:
        raise ValueError(f"paired sides must score the same documents ({na.shape[0]} vs {nb.shape[0]})")
    estimate = 100.0 * (np.exp(nb.sum() / tb.sum() - na.sum() / ta.sum()) - 1.0)
    draws = 100.0 * (resampled_perplexity(nb, tb, weights) / resampled_perplexity(na, ta, weights) - 1.0)
    lo, hi = percentile_interval(draws, confidence)
    return {"percent": float(estimate), "low": lo, "high": hi, "excludes_zero": bool(lo > 0 or hi < 0)}


def _series(result: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(result["document_nll"], np.float64), np.asarray(result["document_tokens"], np.float64)


def add_intervals(report: dict, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED) -> dict:
    """Fill ``report`` with bootstrap intervals from its per-document sums (and return it).

    Adds ``interval`` (perplexity, low, high) to every result; ``report["comparisons"]``: for every
    model and protocol, every pair of its context lengths (``shorter → longer``); for every
    context length and protocol, every pair of models (in report order). One set of resampled
    documents serves every number, so all intervals are paired.
    """
    models = report["models"]
    n_docs = {len(r["document_nll"]) for m in models for r in m["results"]}
    if not n_docs or n_docs == {0}:
        return report
    if len(n_docs) != 1:
        raise ValueError("results score different numbers of documents; intervals need the same documents")
    weights = resample_weights(n_docs.pop(), resamples, seed)
    for m in models:
        for r in m["results"]:
            r["interval"] = perplexity_interval(*_series(r), weights, confidence)
    contexts, rows = [], []
    for m in models:
        by = {}
        for r in m["results"]:
            by.setdefault(r.get("protocol", "non-overlapping"), {})[r["context_length"]] = r
        for protocol, at in by.items():
            for a, b in itertools.combinations(sorted(at), 2):
                contexts.append({"model": m["name"], "protocol": protocol, "from": a, "to": b,
                                 **relative_difference(_series(at[a]), _series(at[b]), weights, confidence)})
    for (i, ma), (j, mb) in itertools.combinations(enumerate(models), 2):
        ra = {(r.get("protocol", "non-overlapping"), r["context_length"]): r for r in ma["results"]}
        rb = {(r.get("protocol", "non-overlapping"), r["context_length"]): r for r in mb["results"]}
        for key in sorted(set(ra) & set(rb), key=lambda k: (k[0], k[1])):
            rows.append({"protocol": key[0], "context_length": key[1], "a": ma["name"], "b": mb["name"],
                         **relative_difference(_series(ra[key]), _series(rb[key]), weights, confidence)})
    report["intervals"] = {"method": "percentile bootstrap over documents, paired", "resamples": resamples,
                           "confidence": confidence, "seed": seed}
    report["comparisons"] = {"contexts": contexts, "models": rows}
    return report


__all__ = ["add_intervals", "perplexity_interval", "relative_difference", "resample_weights", "resampled_perplexity"]
