"""Bradley–Terry maximum likelihood on aggregated counts (LOSSES.md I2), and the Davidson tie model.

Strengths are natural log-strengths θ (K,); ratings are ``base + scale·θ`` (see ``ratings.py``).
Both fitters work on K×K matrices only, so their cost does not depend on the number of records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from scipy.special import expit, log_expit


@dataclass
class Fit:
    """Fitted natural log-strengths ``theta`` (K,), centred to mean 0, plus fitter diagnostics."""

    theta: np.ndarray
    iterations: int
    converged: bool
    tie_log_nu: float | None = None  # Davidson only: log ν


def bt_nll(theta: np.ndarray, wins: np.ndarray, l2: float = 0.0) -> float:
    """NLL(θ) = −Σ_ij W_ij · log σ(θ_i − θ_j) + (l2/2)·‖θ‖²;  W (K, K) weighted wins of i over j."""
    d = theta[:, None] - theta[None, :]  # (K, K)
    mask = wins > 0  # skip 0·log(σ) = 0·(−inf) on separated pairs
    return float(-(wins[mask] * log_expit(d[mask])).sum() + 0.5 * l2 * theta @ theta)


def newton_minimise(
    fgh: Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray]],
    f_only: Callable[[np.ndarray], float],
    theta: np.ndarray,
    l2: float,
    max_iter: int = 200,
    tol: float = 1e-10,
    n_theta: int | None = None,
) -> Fit:
    """Damped Newton for a convex objective of θ (K,), shift-invariant in θ when l2 = 0.

    ``fgh(x)`` returns (f, gradient, Hessian). With l2 = 0 the Hessian is singular along
    u = (1,…,1) on the first ``n_theta`` coordinates (θ is identified only up to a shift); solving
    with H + uuᵀ/|u|² gives the step with Σδθ = 0, so θ stays centred. Extra coordinates after θ
    (Davidson's log ν) are returned in ``Fit.tie_log_nu``. Backtracking (Armijo) keeps every step a
    descent step, so separated data (an undefeated group, e.g. in a bootstrap resample) drifts
    apart slowly instead of overflowing.
    """
    k = len(theta) if n_theta is None else n_theta
    u = np.r_[np.ones(k), np.zeros(len(theta) - k)]
    shift = np.outer(u, u) / k if l2 == 0 else 0.0
    f = f_only(theta)
    for it in range(1, max_iter + 1):
        _, g, h = fgh(theta)
        step = -spd_solve(h + shift, g)
        decrement = -g @ step  # Newton decrement²: the predicted decrease ×2
        if decrement < tol * max(1.0, abs(f)) and np.abs(step).max() < 1e-7:
            return _result(theta, k, it, True)
        t = 1.0
        while t > 1e-10:
            cand = theta + t * step
            fc = f_only(cand)
            if fc <= f - 1e-4 * t * decrement:
                break
            t *= 0.5
        else:  # no decrease possible: at the optimum to float precision
            return _result(theta, k, it, True)
        theta, f = cand, fc
    return _result(theta, k, max_iter, False)


def _result(x: np.ndarray, k: int, iterations: int, converged: bool) -> Fit:
    return Fit(_centre(x[:k]), iterations, converged, float(x[k]) if len(x) > k else None)


def fit_bt(
    wins: np.ndarray,
    l2: float = 0.0,
    theta0: np.ndarray | None = None,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> Fit:
    """Bradley–Terry MLE / MAP by damped Newton (``newton_minimise``) on the aggregated win matrix.

    Model P(i ≻ j) = σ(θ_i − θ_j). With N = W + Wᵀ and p_ij = σ(θ_i − θ_j):
      gradient g_i = −Σ_j (W_ij − N_ij·p_ij) + l2·θ_i
      Hessian  H = Laplacian(N_ij·p_ij·(1 − p_ij)) + l2·I        (K, K)
    Ties must already be split into W (half a win each way). Cost per step: O(K²) + one K×K
    Cholesky, independent of the number of records.
    """
    k = wins.shape[0]
    n = wins + wins.T

    def fgh(theta):
        p = expit(theta[:, None] - theta[None, :])  # (K, K)
        g = -(wins - n * p).sum(1) + l2 * theta
        c = n * p * (1.0 - p)
        return 0.0, g, np.diag(c.sum(1) + l2) - c

    theta = np.zeros(k) if theta0 is None else np.array(theta0, dtype=np.float64)
    return newton_minimise(fgh, lambda t: bt_nll(t, wins, l2), theta, l2, max_iter, tol)


def spd_solve(h: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Solve H x = g for the (K, K) symmetric positive-definite Newton matrix by Cholesky: ~30x
    faster than np.linalg.solve at K = 100 on a busy machine (no LU pivoting, no BLAS threads to
    wake); least squares if H is only semi-definite (a system without comparisons)."""
    try:
        return cho_solve(cho_factor(h, check_finite=False), g, check_finite=False)
    except LinAlgError:
        return np.linalg.lstsq(h, g, rcond=None)[0]


def _centre(theta: np.ndarray) -> np.ndarray:
    # Ratings are reported relative to the mean or an anchor, so only differences matter; with a
    # prior the MAP is already centred up to float error (the gradient of the prior sums to Σθ).
    return theta - theta.mean()


def davidson_nll_grad(
    params: np.ndarray, wins: np.ndarray, ties: np.ndarray, l2: float = 0.0
) -> tuple[float, np.ndarray]:
    """Davidson (1970) NLL and gradient; params = (θ (K,), η = log ν).

    With d = θ_i − θ_j and D_ij = e^{d/2} + e^{−d/2} + ν:
      P(i ≻ j) = e^{d/2}/D_ij,  P(tie) = ν/D_ij          (= ν√(π_iπ_j)/(π_i + π_j + ν√(π_iπ_j)))
      NLL = −Σ_ij W_ij·(d_ij/2 − log D_ij) − ½·Σ_ij T_ij·(η − log D_ij) + (l2/2)‖θ‖²
    where T is the symmetric tie matrix (each tie appears in T_ij and T_ji, hence the ½).
    """
    theta, eta = params[:-1], params[-1]
    d = theta[:, None] - theta[None, :]  # (K, K)
    log_d = np.logaddexp(np.logaddexp(0.5 * d, -0.5 * d), eta)
    nll = -(wins * (0.5 * d - log_d)).sum() - 0.5 * (ties * (eta - log_d)).sum() + 0.5 * l2 * theta @ theta
    # ∂ log D/∂d = (P_ij − P_ji)/2 ; ∂ log D/∂η = ν/D = P(tie)
    dlogd = 0.5 * (np.exp(0.5 * d - log_d) - np.exp(-0.5 * d - log_d))
    mass = wins + 0.5 * ties  # every record of the ordered pair enters through log D_ij
    gd = -0.5 * wins + mass * dlogd  # ∂NLL/∂d_ij, (K, K)
    g_theta = gd.sum(1) - gd.sum(0) + l2 * theta
    g_eta = (mass * np.exp(eta - log_d)).sum() - 0.5 * ties.sum()
    return float(nll), np.r_[g_theta, g_eta]


def davidson_hessian(params: np.ndarray, wins: np.ndarray, ties: np.ndarray, l2: float = 0.0) -> np.ndarray:
    """Hessian (K+1, K+1) of ``davidson_nll_grad``'s objective in (θ, η).

    Per ordered pair, with m = W_ij + ½T_ij, s = ∂log D/∂d = sinh(d/2)/D, q = ν/D:
      ∂²/∂d² = m·(cosh(d/2)/(2D) − s²),  ∂²/∂d∂η = −m·s·q,  ∂²/∂η² = m·(q − q²).
    The NLL is a sum of log-sum-exps of affine functions of (d, η), hence convex.
    """
    theta, eta = params[:-1], params[-1]
    k = len(theta)
    d = theta[:, None] - theta[None, :]
    log_d = np.logaddexp(np.logaddexp(0.5 * d, -0.5 * d), eta)
    sh = 0.5 * (np.exp(0.5 * d - log_d) - np.exp(-0.5 * d - log_d))  # sinh(d/2)/D
    ch = 0.5 * (np.exp(0.5 * d - log_d) + np.exp(-0.5 * d - log_d))  # cosh(d/2)/D
    q = np.exp(eta - log_d)
    m = wins + 0.5 * ties
    hdd = m * (0.5 * ch - sh**2)
    c = hdd + hdd.T  # f_ij(θ_i − θ_j) and f_ji share the pair
    h = np.zeros((k + 1, k + 1))
    h[:k, :k] = np.diag(c.sum(1) + l2) - c
    hde = -m * sh * q
    h[:k, k] = h[k, :k] = hde.sum(1) - hde.sum(0)
    h[k, k] = (m * (q - q**2)).sum()
    return h


def fit_davidson(
    wins: np.ndarray,
    ties: np.ndarray,
    l2: float = 0.0,
    x0: np.ndarray | None = None,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> Fit:
    """Davidson tie model by damped Newton on the aggregated counts, x = (θ (K,), η = log ν).
    Starts from the half-win BT fit and the ν that matches the observed tie share."""
    if x0 is None:
        total = max(wins.sum() + 0.5 * ties.sum(), 1e-12)
        bt = fit_bt(wins + 0.5 * ties, l2, max_iter=max_iter)
        tie_share = 0.5 * ties.sum() / total
        # At equal strengths P(tie) = ν/(2 + ν): invert the observed tie share for the start.
        nu0 = 2 * tie_share / max(1 - tie_share, 1e-6)
        x0 = np.r_[bt.theta, np.log(max(nu0, 1e-6))]

    def fgh(x):
        f, g = davidson_nll_grad(x, wins, ties, l2)
        return f, g, davidson_hessian(x, wins, ties, l2)

    return newton_minimise(
        fgh,
        lambda x: davidson_nll_grad(x, wins, ties, l2)[0],
        np.array(x0, dtype=np.float64),
        l2,
        max_iter,
        tol,
        n_theta=wins.shape[0],
    )


def bt_win_prob(theta: np.ndarray) -> np.ndarray:
    """P[i, j] = σ(θ_i − θ_j) (K, K): the predicted probability that i beats j (diagonal ½)."""
    return expit(theta[:, None] - theta[None, :])


def davidson_probs(theta: np.ndarray, log_nu: float) -> tuple[np.ndarray, np.ndarray]:
    """(P(i ≻ j), P(i ~ j)) under Davidson, both (K, K)."""
    d = theta[:, None] - theta[None, :]
    log_d = np.logaddexp(np.logaddexp(0.5 * d, -0.5 * d), log_nu)
    return np.exp(0.5 * d - log_d), np.exp(log_nu - log_d)
