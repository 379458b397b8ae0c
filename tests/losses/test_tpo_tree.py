"""tpo_tree (METHODS.md §M4): golden values of §M4(d), float64 parity of loss and gradients against an explicit
loop over responses, steps and pairs (step clipping, ragged lists, LiPO-λ), ordering and stability properties."""

import math

import numpy as np
import pytest
import torch

from preftune.losses import get
from preftune.losses.base import PolicyStats, RefStats
from preftune.losses.tree import tree_rewards

TPO = get("tpo_tree").fn


def _stats(rho, ids, hidden, scores, valid=None, scale=1.0):
    rho = torch.as_tensor(rho, dtype=torch.float64).clone().requires_grad_(True)
    mask = torch.as_tensor(ids) >= 0
    pol = PolicyStats(
        logps=(rho * mask).sum(-1), lengths=mask.sum(-1).double(), valid=valid,
        token_logps=rho * mask * scale, token_mask=mask,
        inputs={"scores": torch.as_tensor(scores, dtype=torch.float64), "step_ids": torch.as_tensor(ids),
                "step_hidden": torch.as_tensor(hidden, dtype=torch.float64)},
    )
    ref = RefStats(logps=torch.zeros(rho.shape[:2], dtype=torch.float64),
                   token_logps=torch.zeros_like(rho, dtype=torch.float64))
    return pol, ref, rho


def _golden():
    rho = [[[0.2, 0.1, 0.4, 0.3], [0.2, 0.1, -0.3, -0.1], [-0.2, -0.4, -0.5, 0.1]]]
    ids = [[[0, 0, 1, 1]] * 3]
    hidden = [[[[1, 0], [0, 1]], [[1, 0], [0.6, 0.8]], [[0.8, 0.6], [-1, 0]]]]
    return rho, ids, hidden, [[100.0, 40.0, -20.0]]


def test_golden_rewards_and_loss():
    pol, ref, _ = _stats(*_golden())
    z, _ = tree_rewards(pol, ref)
    np.testing.assert_allclose(z[0].detach().numpy(), [0.250000, -0.015789, -0.264286], atol=1e-5)
    assert TPO(pol, ref, beta=0.5).losses.item() == pytest.approx(0.611559, abs=1e-5)


def _released(z, psi, beta):
    """The released code's list loss (parity only, METHODS.md §M4(b)): mean over all N² ordered pairs (i = j and
    ties add log 2) of −logσ((z_i − z_j)·sign(ψ_i − ψ_j)), then −logσ(β·inner)."""
    n = len(z)
    inner = sum(math.log1p(math.exp(-(z[i] - z[j]) * np.sign(psi[i] - psi[j]))) for i in range(n) for j in range(n))
    inner /= n * (n - 1)
    return inner, math.log1p(math.exp(-beta * inner))


def test_released_form_values_from_the_same_rewards():
    pol, ref, _ = _stats(*_golden())
    z = tree_rewards(pol, ref)[0][0].tolist()
    inner, code = _released(z, [100, 40, -20], 0.5)
    assert inner == pytest.approx(0.884694, abs=1e-5) and code == pytest.approx(0.496236, abs=1e-5)


def _explicit(rho, ids, hidden, scores, valid, beta, weighting):
    """Loops: per group, S_min, step means, 1 + cos to the best response's steps, z, pairs, LiPO-λ."""
    out = []
    for b in range(len(rho)):
        live = [k for k in range(len(rho[b])) if valid[b][k]]
        s_min = min(max(ids[b][k]) + 1 for k in live)
        gold = max(live, key=lambda k: scores[b][k])
        means, present = {}, {}
        for k in live:
            for s in range(s_min):
                toks = [rho[b][k][t] for t in range(len(ids[b][k])) if min(ids[b][k][t], s_min - 1) == s
                        and ids[b][k][t] >= 0]
                present[k, s] = bool(toks)
                means[k, s] = sum(toks) / len(toks) if toks else 0.0
        z = {}
        for k in live:
            num = den = 0.0
            for s in range(s_min):
                if not present[k, s]:
                    continue
                h, g = np.asarray(hidden[b][k][s], float), np.asarray(hidden[b][gold][s], float)
                a = 1.0 + float(h @ g / max(np.linalg.norm(h) * np.linalg.norm(g), 1e-8))
                num, den = num + a * means[k, s], den + a
            z[k] = num / den
        lo, hi = min(scores[b][k] for k in live), max(scores[b][k] for k in live)
        rank = {k: 1 + sum(z[j] > z[k] for j in live) for k in live}
        total = wsum = 0.0
        for i in live:
            for j in live:
                if scores[b][i] > scores[b][j]:
                    w = 1.0
                    if weighting == "lipo_lambda":
                        gi, gj = (2 ** ((scores[b][x] - lo) / (hi - lo)) - 1 for x in (i, j))
                        w = abs(gi - gj) * abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
                    total += w * math.log1p(math.exp(-beta * (z[i] - z[j])))
                    wsum += w
        out.append(total / wsum if wsum > 0 else 0.0)
    return out


def _case(rng, batch):
    K, T, H, S = 4, 9, 3, 4
    rho = rng.normal(size=(batch, K, T))
    ids = np.full((batch, K, T), -1)
    for b in range(batch):
        for k in range(K):
            n = rng.integers(3, T + 1)
            cuts = np.sort(rng.choice(np.arange(1, n), size=min(rng.integers(1, S), n - 1), replace=False))
            ids[b, k, :n] = np.searchsorted(cuts, np.arange(n), side="right")
    hidden = rng.normal(size=(batch, K, S, H))
    scores = rng.integers(-3, 4, size=(batch, K)).astype(float)
    scores[:, 0] = 10.0  # a unique best per group
    valid = np.ones((batch, K), bool)
    valid[0, -1] = batch > 1  # a ragged group when B > 1
    return rho, ids, hidden, scores, valid


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("weighting", ["none", "lipo_lambda"])
def test_float64_parity_of_loss_and_gradients(batch, weighting):
    rho, ids, hidden, scores, valid = _case(np.random.default_rng(batch), batch)
    pol, ref, leaf = _stats(rho, ids, hidden, scores, torch.as_tensor(valid))
    loss = TPO(pol, ref, beta=0.7, weighting=weighting).losses
    want = _explicit(rho.tolist(), ids.tolist(), hidden.tolist(), scores.tolist(), valid.tolist(), 0.7, weighting)
    np.testing.assert_allclose(loss.detach().numpy(), want, atol=1e-10)
    loss.sum().backward()
    eps, grad = 1e-6, np.zeros_like(rho)
    for idx in np.ndindex(*rho.shape):
        if ids[idx] < 0:
            continue
        up, dn = rho.copy(), rho.copy()
        up[idx] += eps
        dn[idx] -= eps
        args = (ids.tolist(), hidden.tolist(), scores.tolist(), valid.tolist(), 0.7, weighting)
        grad[idx] = (sum(_explicit(up.tolist(), *args)) - sum(_explicit(dn.tolist(), *args))) / (2 * eps)
    np.testing.assert_allclose(leaf.grad.numpy(), grad, atol=1e-6)


def test_loss_falls_when_rewards_agree_with_scores():
    rho, ids, hidden, _ = _golden()
    agree = TPO(*_stats(rho, ids, hidden, [[3.0, 2.0, 1.0]])[:2]).losses.item()
    disagree = TPO(*_stats(rho, ids, hidden, [[1.0, 2.0, 3.0]])[:2]).losses.item()
    assert agree < math.log(2) < disagree


def test_steps_past_the_shortest_response_merge_into_its_last_step():
    # r1 has 3 steps, r2 has 2: r1's steps 1 and 2 become one step of 3 tokens (mean 0.4); no hidden weighting.
    rho = [[[0.1, 0.2, 0.5, 0.5], [0.3, 0.3, 0.0, 0.0]]]
    ids = [[[0, 1, 1, 2], [0, 1, -1, -1]]]
    hidden = np.ones((1, 2, 3, 2))
    pol, ref, _ = _stats(rho, ids, hidden, [[1.0, 0.0]])
    z, _ = tree_rewards(pol, ref)
    assert z[0].tolist() == pytest.approx([(0.1 + 0.4) / 2, 0.3])


def test_hidden_states_get_no_gradient_and_large_ratios_stay_finite():
    rho, ids, hidden, scores = _golden()
    h = torch.tensor(hidden, dtype=torch.float32, requires_grad=True)
    pol, ref, leaf = _stats(np.asarray(rho) * 1e4, ids, hidden, scores)
    pol.inputs["step_hidden"] = h
    loss = TPO(pol, ref).losses.sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all() and h.grad is None


def test_trainer_gives_step_ids_from_the_data_steps_and_pooled_hidden_states(tmp_path):
    """The provider's step ids follow the records' steps; its step_hidden equals an explicit float32 forward of the
    policy, one row per response, averaged over each (clipped) step's tokens."""
    import json
    from contextlib import nullcontext
    from types import SimpleNamespace

    from preftune.data.collate import collate
    from preftune.data.tokenize import tokenize_examples
    from preftune.data.trajectories import load_trajectories
    from preftune.model.engine import pack
    from preftune.testing import tiny_model, tiny_tokenizer
    from preftune.train.inputs import _tree_steps

    rows = [{"prompt": "Q:", "responses": ["ab cd", "ab ef gh"], "scores": [1, 0],
             "steps": [["ab ", "cd"], ["ab ", "ef ", "gh"]]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok, model = tiny_tokenizer(), tiny_model("llama", seed=0).eval()
    examples, _ = load_trajectories(path)
    batch = collate(tokenize_examples(examples, tok, chat_template="never"))
    packed = pack(batch.prompt_ids, batch.response_ids, tok.pad_token_id)
    policy = PolicyStats(logps=torch.zeros(1, 2), lengths=packed.lengths)
    runner = SimpleNamespace(tokenizer=tok, base_engine=SimpleNamespace(model=model), pad_id=tok.pad_token_id,
                             acc=SimpleNamespace(device="cpu", autocast=nullcontext))
    got = _tree_steps(runner, batch, packed, policy, None)
    texts = [tok.decode(r) for r in batch.response_ids[0]]
    ids = got["step_ids"][0]
    for k, per in enumerate(rows[0]["steps"]):
        n = len(batch.response_ids[0][k])
        assert (ids[k, n:] == -1).all()
        # tokens before the second step's first character are step 0; the rest (clipped at S_min = 2) are step 1
        first = sum(1 for j in range(n) if len(tok.decode(batch.response_ids[0][k][: j + 1])) <= len(per[0]))
        assert ids[k, :first].tolist() == [0] * first and ids[k, first:n].tolist() == [1] * (n - first), texts[k]
    with torch.no_grad():
        for k in range(2):
            seq = batch.prompt_ids[0] + batch.response_ids[0][k]
            h = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
            resp = h[len(batch.prompt_ids[0]):]
            for s in range(2):
                want = resp[: len(batch.response_ids[0][k])][ids[k, : len(batch.response_ids[0][k])] == s].mean(0)
                torch.testing.assert_close(got["step_hidden"][0, k, s], want, atol=1e-5, rtol=1e-5)


def test_bad_steps_are_refused_with_file_line_and_field(tmp_path):
    import json

    from typer.testing import CliRunner

    from preftune.cli import app
    from preftune.testing import save_tiny_model

    good = {"prompt": "Q:", "responses": ["ab cd", "ab ef"], "scores": [1, 0], "steps": [["ab ", "cd"], ["ab ", "ef"]]}
    rows = [good, {**good, "steps": [["ab ", "cd"], ["ab ", "xx"]]}]  # line 2: steps[1] do not join to "ab ef"
    data = tmp_path / "trees.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = save_tiny_model(tmp_path / "m", "llama", seed=0)
    res = CliRunner().invoke(app, ["train", "--model", str(model), "--data", str(data), "--loss", "tpo_tree",
                                   "--max-steps", "1", "--output", str(tmp_path / "never")])
    assert res.exit_code == 2, res.output
    assert "trees.jsonl:2" in res.output and "steps[1]" in res.output and "differ" in res.output
