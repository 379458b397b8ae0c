"""Tabular preference games: the exact, population-limit version of every online loop (ONLINE.md §11).

One prompt, a finite response set {y_1..y_n}, a tabular softmax policy π = softmax(θ) and a preference
matrix P with P + Pᵀ = 1 and diag(P) = ½. Then P(y_i ≻ π) = (Pπ)_i and every per-iteration update of
the online loops can be computed exactly, in float64, in microseconds. The test suite
(``tests/online/test_tabular.py``) uses this module to check, without a language model, that

* the loops' ideal updates behave as the theory says (average-iterate Nash convergence of SPPO/DNO,
  last-iterate linear convergence of INPO to the τ-regularised equilibrium, the failure of
  Bradley–Terry iterative DPO on cyclic preferences, APO's acceleration), and
* the registry losses, evaluated as population objectives (expectation over (y, y') ~ π_t ⊗ π_t with
  labels ~ Bernoulli(P)), have those updates as their minimisers (``population_objective``).

Hyperparameter mapping between ONLINE.md §11 (and the papers) and the registry losses:

* SPPO step ``s`` = η_SPPO = ``1 / beta`` of the registry ``sppo`` / ``sppo_single`` / ``sppo_hard``
  (β is an inverse step size there). The MW step is π_{t+1} ∝ π_t·exp(s·Pπ_t).
* DNO (Alg. 1) step ``s`` = 1/η_DNO, and η_DNO = ``beta`` of the registry ``dno`` (a DPO loss with β = η):
  π_{t+1} ∝ π_t·exp(Pπ_t / η_DNO).
* INPO ``eta`` and ``tau`` are the registry ``inpo`` hyperparameters unchanged (η an inverse step size,
  τ the KL weight toward π_ref): π_{t+1} ∝ π_t^{1−τ/η}·π_ref^{τ/η}·exp(Pπ_t/η). The ``inpo`` reference
  slot holds π_ref and ``inputs['prev_logps']`` holds log π_t.
* Iterative DPO ``beta`` is the registry ``dpo`` β: π_{t+1} ∝ π_ref·exp(r̂/β).

Policies are float64 probability vectors (n,); the iteration functions carry log-probabilities
internally so that near-pure policies do not underflow. Only numpy, scipy, torch and
``preftune.losses`` are imported.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import OptimizeResult, linprog, minimize, root
from scipy.special import expit, logsumexp

from preftune.losses import Objective, PolicyStats, RefStats, get

# --------------------------------------------------------------------------------------------------
# Preference matrices
# --------------------------------------------------------------------------------------------------


def preference_matrix(upper: dict[tuple[int, int], float], n: int) -> np.ndarray:
    """The n×n matrix with P_ij = ``upper[(i, j)]`` (0-based, i < j), P_ji = 1 − P_ij and diag ½."""
    P = np.full((n, n), 0.5)
    for (i, j), p in upper.items():
        if not 0 <= i < j < n:
            raise ValueError(f"preference_matrix: pair {(i, j)} must satisfy 0 <= i < j < {n}")
        P[i, j], P[j, i] = p, 1.0 - p
    return check_preference_matrix(P)


def check_preference_matrix(P: np.ndarray) -> np.ndarray:
    """Return P as float64 after checking P + Pᵀ = 1, diag(P) = ½ and 0 ≤ P ≤ 1."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"preference matrix must be square, got shape {P.shape}")
    if not np.allclose(P + P.T, 1.0, atol=1e-12, rtol=0) or not np.all((P >= 0) & (P <= 1)):
        raise ValueError("preference matrix must satisfy P + Pᵀ = 1 with entries in [0, 1]")
    return P


def cyclic_matrix() -> np.ndarray:
    """Weighted rock–paper–scissors: P_12 = 0.1, P_13 = 0.7, P_23 = 0.4; Nash (1/7, 2/7, 4/7), value 0.

    A plain RPS matrix has the uniform Nash, where a uniformly initialised method already sits.
    """
    return preference_matrix({(0, 1): 0.1, (0, 2): 0.7, (1, 2): 0.4}, 3)


def cyclic_dominated_matrix() -> np.ndarray:
    """The cyclic matrix plus a dominated y_4 (P_4j = 0.3 for j ≤ 3); Nash (1/7, 2/7, 4/7, 0)."""
    P = np.full((4, 4), 0.5)
    P[:3, :3] = cyclic_matrix()
    P[3, :3], P[:3, 3] = 0.3, 0.7
    return check_preference_matrix(P)


def transitive_matrix(u: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)) -> np.ndarray:
    """Bradley–Terry preferences P_ij = σ(u_i − u_j); the Nash is the point mass on argmax u."""
    u = np.asarray(u, dtype=np.float64)
    return check_preference_matrix(expit(u[:, None] - u[None, :]))


# --------------------------------------------------------------------------------------------------
# Equilibria and distances
# --------------------------------------------------------------------------------------------------


def nash(P: np.ndarray) -> tuple[np.ndarray, float]:
    """Nash (von Neumann winner) of the symmetric game P by linear programming (HiGHS).

    With A = P − ½: minimise v subject to A·π ≤ v·1, Σπ = 1, π ≥ 0. Returns (π*, v); v = 0 for every
    valid P (the game is symmetric and constant-sum).
    """
    P = check_preference_matrix(P)
    n = len(P)
    res = linprog(
        c=np.r_[np.zeros(n), 1.0],
        A_ub=np.c_[P - 0.5, -np.ones(n)],
        b_ub=np.zeros(n),
        A_eq=np.r_[np.ones(n), 0.0][None, :],
        b_eq=[1.0],
        bounds=[(0, None)] * n + [(None, None)],
        method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"nash: linprog failed: {res.message}")
    return res.x[:n], float(res.x[n])


def exploitability(P: np.ndarray, pi: np.ndarray) -> float:
    """e(π) = max_i (Pπ)_i − ½ ≥ 0, zero exactly at a Nash policy (half the duality gap)."""
    return float(np.max(P @ pi) - 0.5)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) in nats, with 0·log 0 = 0."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


def regularised_nash(
    P: np.ndarray, ref: np.ndarray, tau: float, damping: float = 0.5, tol: float = 1e-15, max_iter: int = 100_000
) -> np.ndarray:
    """π*_τ, the equilibrium of the τ-KL-regularised game (the limit of INPO), by damped fixed point.

    π*_τ solves π = softmax(log π_ref + Pπ/τ); the iteration π ← (1−d)·π + d·softmax(log π_ref + Pπ/τ)
    starts at π_ref and stops when no entry moves by more than ``tol``. Its exploitability is O(τ).
    """
    log_ref = np.log(ref)
    pi = np.asarray(ref, dtype=np.float64).copy()
    for _ in range(max_iter):
        new = (1 - damping) * pi + damping * _softmax(log_ref + (P @ pi) / tau)
        if np.max(np.abs(new - pi)) <= tol:
            return new
        pi = new
    raise RuntimeError(f"regularised_nash: no convergence in {max_iter} iterations (lower damping)")


def fit_bt(P: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Bradley–Terry MLE r̂ (mean 0) on pairs (y, y') ~ π ⊗ π with labels ~ Bernoulli(P).

    The likelihood's stationarity conditions, divided by π_i, read Σ_j π_j·(σ(r_i − r_j) − P_ij) = 0 for
    every i; written this way they stay well scaled for near-pure π (and define r_i even where π_i = 0),
    where gradient-norm stopping rules on the likelihood stop early on the rarely sampled responses.
    One condition is implied by the others (their π-weighted sum is 0) and is replaced by Σr = 0.
    π uniform gives the fixed reward model fitted on uniform pairs.
    """
    pi = np.asarray(pi, dtype=np.float64)
    n = len(P)
    drop = int(np.argmax(pi))

    def equations(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = expit(r[:, None] - r[None, :])  # (n, n)
        f = (s - P) @ pi
        jac = -pi[None, :] * s * (1 - s)
        np.fill_diagonal(jac, 0.0)
        np.fill_diagonal(jac, -jac.sum(1))
        f[drop], jac[drop] = r.sum(), 1.0
        return f, jac

    r = root(equations, np.zeros(n), jac=True, method="hybr", options={"xtol": 1e-15}).x
    residual = np.max(np.abs(equations(r)[0]))
    if not residual < 1e-10:
        raise RuntimeError(f"fit_bt: Bradley–Terry fit did not converge (residual {residual:.2e})")
    return r - r.mean()


# --------------------------------------------------------------------------------------------------
# Exact per-iteration updates (population limit of each loop)
# --------------------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(logits - logsumexp(logits))


def _normalise(log_pi: np.ndarray) -> np.ndarray:
    return log_pi - logsumexp(log_pi)


def mw_step(P: np.ndarray, pi: np.ndarray, step: float, gains: np.ndarray | None = None) -> np.ndarray:
    """Multiplicative weights π_{t+1} ∝ π_t·exp(s·g), g = Pπ_t (or the given ``gains`` estimate).

    SPPO: s = η_SPPO = 1/β of the ``sppo`` loss. DNO (Alg. 1): s = 1/η_DNO (``dno``'s β).
    """
    g = P @ pi if gains is None else gains
    return _softmax(np.log(pi) + step * g)


def inpo_step(
    P: np.ndarray, pi: np.ndarray, ref: np.ndarray, eta: float, tau: float, gains: np.ndarray | None = None
) -> np.ndarray:
    """INPO's OMD step π_{t+1} ∝ π_t^{1−τ/η}·π_ref^{τ/η}·exp(g/η), g = Pπ_t (or the given estimate)."""
    g = P @ pi if gains is None else gains
    return _softmax((1 - tau / eta) * np.log(pi) + (tau / eta) * np.log(ref) + g / eta)


def dpo_step(log_ref: np.ndarray, reward: np.ndarray, beta: float) -> np.ndarray:
    """The DPO/RLHF optimum log π = log π_ref + r/β − log Z (the population argmin of ``dpo`` on BT labels)."""
    return _normalise(log_ref + reward / beta)


def apo_extrapolate(log_new: np.ndarray, log_old: np.ndarray, alpha: float) -> np.ndarray:
    """APO's Nesterov step log π̂_{t+1} = (1+α)·log π_{t+1} − α·log π_t, renormalised.

    α = 0 returns ``log_new`` itself, so an APO loop with α = 0 is bit-identical to its base method.
    """
    if alpha == 0:
        return log_new
    return _normalise((1 + alpha) * log_new - alpha * log_old)


def sampled_gains(P: np.ndarray, pi: np.ndarray, k: int, rng: np.random.Generator | None) -> np.ndarray:
    """Unbiased estimate of Pπ from K draws y'_1..y'_K ~ π: ĝ_i = (1/K)·Σ_k 1[y_i ≻ y'_k], labels ~ P.

    Every response is judged once against each draw (one Bernoulli(P_{i,y'_k}) label per pair; a
    response drawn against itself is a fair coin, P_ii = ½).
    """
    if rng is None:
        raise ValueError("sampled_gains: pass a numpy Generator (e.g. np.random.default_rng(0)) with k")
    opponents = rng.choice(len(pi), size=k, p=pi)
    return (rng.random((len(pi), k)) < P[:, opponents]).mean(axis=1)


# --------------------------------------------------------------------------------------------------
# Loops (trajectories are (T+1, n) arrays of policies, row t = π_t)
# --------------------------------------------------------------------------------------------------


def multiplicative_weights(
    P: np.ndarray,
    pi0: np.ndarray,
    step: float,
    iterations: int,
    k: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """SPPO / DNO (Alg. 1) in the population limit: T multiplicative-weights steps from π_0.

    With ``k`` set, each step uses ``sampled_gains`` (K draws from π_t, labels ~ P) instead of Pπ_t.
    Their average iterate (1/T)·Σ_{t<T} π_t is the Hedge play: e(π̄_T) ≤ ln n/(sT) + s/8 (gains in [0, 1]).
    """
    traj = [np.asarray(pi0, dtype=np.float64)]
    for _ in range(iterations):
        pi = traj[-1]
        traj.append(mw_step(P, pi, step, None if k is None else sampled_gains(P, pi, k, rng)))
    return np.array(traj)


def inpo(
    P: np.ndarray,
    ref: np.ndarray,
    eta: float,
    tau: float,
    iterations: int,
    pi1: np.ndarray | None = None,
    k: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """INPO in the population limit from π_1 (default π_ref); converges in the last iterate to π*_τ.

    Observed (and Thm 4 without its sampling term): KL(π*_τ ‖ π_{t+1}) ≤ (1 − τ/η)·KL(π*_τ ‖ π_t).
    With ``k`` set, each step uses ``sampled_gains`` instead of Pπ_t.
    """
    traj = [np.asarray(ref if pi1 is None else pi1, dtype=np.float64)]
    for _ in range(iterations):
        pi = traj[-1]
        traj.append(inpo_step(P, pi, ref, eta, tau, None if k is None else sampled_gains(P, pi, k, rng)))
    return np.array(traj)


def iterative_dpo(
    P: np.ndarray,
    pi0: np.ndarray,
    beta: float,
    iterations: int,
    reward: str | np.ndarray = "uniform",
    reference: str = "previous",
) -> np.ndarray:
    """Iterative Bradley–Terry DPO in the population limit: π_{t+1} ∝ π_ref(t)·exp(r̂_t/β).

    ``reward``: "uniform" (a reward model fitted once by ``fit_bt`` on uniform pairs — the RLHFlow
    pipeline), "on_policy" (refitted each iteration on π_t ⊗ π_t; this step is also the population
    argmin of the ``dpo`` loss with reference π_t on labels ~ P), or a fixed reward vector.
    ``reference``: "previous" (π_ref(t) = π_t) or "initial" (π_0, where a fixed r̂ gives the same
    π_t = π_0·exp(r̂/β)/Z for every t ≥ 1).
    """
    if reference not in ("previous", "initial"):
        raise ValueError(f"iterative_dpo: reference must be 'previous' or 'initial', got {reference!r}")
    if isinstance(reward, str) and reward not in ("uniform", "on_policy"):
        raise ValueError(f"iterative_dpo: reward must be 'uniform', 'on_policy' or an array, got {reward!r}")
    n = len(P)
    fixed = fit_bt(P, np.full(n, 1.0 / n)) if isinstance(reward, str) and reward == "uniform" else reward
    log0 = np.log(np.asarray(pi0, dtype=np.float64))
    logs = [log0]
    for _ in range(iterations):
        r = fit_bt(P, np.exp(logs[-1])) if isinstance(fixed, str) else fixed
        logs.append(dpo_step(logs[-1] if reference == "previous" else log0, r, beta))
    return np.exp(np.array(logs))


def apo(
    step: Callable[[np.ndarray], np.ndarray], pi0: np.ndarray, alpha: float, iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """Accelerated PO around a base update: π_{t+1} = step(log π̂_t), then π̂_{t+1} by ``apo_extrapolate``.

    ``step`` maps the reference log-policy to the next log-policy (e.g. ``dpo_step(·, r, β)``); π̂_0 = π_0.
    Returns the trajectories (π_t) and (π̂_t), each (T+1, n).
    """
    log_pi = np.log(np.asarray(pi0, dtype=np.float64))
    pis, hats = [log_pi], [log_pi]
    for _ in range(iterations):
        new = step(hats[-1])
        hats.append(apo_extrapolate(new, pis[-1], alpha))
        pis.append(new)
    return np.exp(np.array(pis)), np.exp(np.array(hats))


# --------------------------------------------------------------------------------------------------
# Registry losses as population objectives
# --------------------------------------------------------------------------------------------------


def population_objective(
    objective: str | Objective,
    P: np.ndarray,
    pi_t: np.ndarray,
    ref: np.ndarray | None = None,
    **hyperparameters: float,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The population loss of a paired registry objective on a tabular policy, as a function of θ.

    Returns f(θ) = E_{(y, y') ~ π_t ⊗ π_t, label ~ Bernoulli(P)} L(chosen, rejected), θ a float64 tensor
    (n,) of logits of π_θ = softmax(θ). Each response is a one-token sequence with log-prob log π(y).
    All n² ordered pairs (i, j) are one batch with chosen i, rejected j and weight 2·π_t(i)·π_t(j)·P_ij
    (the pair drawn in either order, then labelled; the weights sum to 1).

    The reference slot holds ``ref`` (default π_t, the previous iterate of SPPO/DNO/iterative DPO; for
    ``inpo`` pass π_ref). Data inputs are exact population quantities: ``win_probs`` = ((Pπ_t)_i,
    (Pπ_t)_j), ``pair_win_prob`` = P_ij, ``prev_logps`` = (log π_t(i), log π_t(j)).
    """
    obj = get(objective) if isinstance(objective, str) else objective
    P = check_preference_matrix(P)
    pi_t = np.asarray(pi_t, dtype=np.float64)
    n = len(pi_t)
    i, j = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    pairs = torch.from_numpy(np.stack([i, j], axis=1))  # (n², 2): chosen, rejected
    weights = torch.from_numpy(2.0 * pi_t[i] * pi_t[j] * P[i, j])  # (n²,)
    log_pi_t = torch.from_numpy(np.log(pi_t))
    available = {
        "win_probs": torch.from_numpy(P @ pi_t)[pairs],
        "pair_win_prob": torch.from_numpy(P[i, j]),
        "prev_logps": log_pi_t[pairs],
    }
    if obj.shape != "paired" or obj.token_level:
        raise ValueError(
            f"population_objective: '{obj.name}' is not a paired sequence-level objective (shape {obj.shape}, "
            f"token_level {obj.token_level})"
        )
    missing = [k for k in obj.inputs if k not in available]
    if missing:
        raise ValueError(f"population_objective: '{obj.name}' needs inputs {missing}; known: {sorted(available)}")
    inputs = {k: available[k] for k in obj.inputs}
    ref_stats = RefStats((log_pi_t if ref is None else torch.from_numpy(np.log(ref)))[pairs])
    lengths = torch.ones(len(i), 2, dtype=torch.float64)

    def f(theta: torch.Tensor) -> torch.Tensor:
        log_pi = torch.log_softmax(theta, dim=0)
        policy = PolicyStats(log_pi[pairs], lengths, inputs=inputs)
        return (weights * obj.fn(policy, ref_stats, **hyperparameters).losses).sum()

    return f


def population_argmin(
    f: Callable[[torch.Tensor], torch.Tensor], theta0: np.ndarray, gtol: float = 1e-12
) -> tuple[np.ndarray, OptimizeResult]:
    """Minimise a population objective over θ with scipy BFGS and torch autograd gradients.

    Returns (softmax(θ*), the scipy result). BFGS may report precision loss at ``gtol`` near machine
    precision; callers compare the returned policy with the closed form rather than trust the flag.
    """

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = f(theta)
        (grad,) = torch.autograd.grad(value, theta)
        return value.item(), grad.numpy()

    res = minimize(
        value_and_grad,
        np.asarray(theta0, dtype=np.float64),
        jac=True,
        method="BFGS",
        options={"gtol": gtol, "maxiter": 10_000},
    )
    return _softmax(res.x), res
