"""Ranks of estimates the estimator cannot always tell apart: ties within a resolution, and Spearman's rho."""
from __future__ import annotations


def resolved(values: list[float], resolution: float) -> list[float]:
    """The values, in their order, with each run of them within `resolution` (a share) below the highest of
    the run made equal to it: estimates the estimator cannot tell apart tie (a tie takes the mean rank)."""
    out, top = list(values), None
    for i in sorted(range(len(values)), key=lambda i: -values[i]):
        if top is None or values[i] * (1 + resolution) < top:
            top = values[i]
        out[i] = top
    return out


def tied_ranks(values: list[float], resolution: float) -> list[str]:
    """1 for the highest, ties written '2=' (they share the better rank)."""
    values = resolved(values, resolution)
    return [f"{1 + sum(w > v for w in values)}" + ("=" if values.count(v) > 1 else "") for v in values]


def spearman(xs: list[float], ys: list[float], x_resolution: float = 0.0) -> float | None:
    """Spearman's rank correlation (scipy's, ties at their mean rank), with xs closer than x_resolution tied;
    None below 3 pairs or without spread."""
    xs = resolved(xs, x_resolution)
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    from scipy.stats import spearmanr
    return float(spearmanr(xs, ys).statistic)
