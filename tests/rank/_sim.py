"""Synthetic side-by-side data drawn from known strengths (shared by the rank tests)."""

from __future__ import annotations

import json

import numpy as np


def bt_battles(theta, n, rng, tie_rate=0.0):
    """n comparisons between uniformly drawn distinct pairs; outcome ~ Bradley-Terry σ(θa − θb);
    a fraction ``tie_rate`` of records (chosen independently of strength) become ties."""
    k = len(theta)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
    win = rng.random(n) < p
    winner = np.where(win, "a", "b").astype(object)
    winner[rng.random(n) < tie_rate] = "tie"
    return a, b, winner


def davidson_battles(theta, nu, n, rng):
    k = len(theta)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    d = theta[a] - theta[b]
    den = np.exp(d / 2) + np.exp(-d / 2) + nu
    u = rng.random(n)
    pa, pt = np.exp(d / 2) / den, nu / den
    winner = np.where(u < pa, "a", np.where(u < pa + pt, "tie", "b")).astype(object)
    return a, b, winner


def pl_rankings(theta, n, rng, size=None):
    """Full (or ``size``-subset) rankings from Plackett-Luce via the Gumbel-max trick."""
    k = len(theta)
    out = []
    for _ in range(n):
        items = np.arange(k) if size is None else rng.choice(k, size, replace=False)
        g = theta[items] + rng.gumbel(size=len(items))
        out.append(items[np.argsort(-g)].tolist())
    return out


def write_battles(path, a, b, winner, names=None, extra=None):
    names = names or [f"sys{i}" for i in range(max(max(a), max(b)) + 1)]
    with open(path, "w", encoding="utf-8") as f:
        for i, (x, y, w) in enumerate(zip(a, b, winner, strict=True)):
            rec = {"a": names[x], "b": names[y], "winner": str(w)}
            if extra:
                rec.update(extra(i))
            f.write(json.dumps(rec) + "\n")
    return path


def spearman(x, y):
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])
