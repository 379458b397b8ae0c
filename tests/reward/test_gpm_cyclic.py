"""GPM fits a cyclic preference set that no Bradley–Terry (scalar) reward can.

Two levels: a direct embedding test (one learnable vector per item, the same losses the trainer
uses) and one end-to-end run of `train_reward` on a tiny model with rock–paper–scissors as text.
"""

import itertools
import math

import pytest
import torch

from preftune.losses.reward import bt_reward_loss, gpm_loss, gpm_score
from preftune.reward.synthetic import RPS, cyclic_pairs


def _tournament(n):
    """(winner, loser) index pairs of the circular tournament on n items."""
    return [((i + d) % n, i) for i in range(n) for d in range(1, (n - 1) // 2 + 1)]


def _best_scalar_accuracy(n):
    """The best pairwise accuracy any strict ordering (= any scalar reward) reaches on the tournament."""
    pairs = _tournament(n)
    best = 0.0
    for perm in itertools.permutations(range(n)):
        rank = {item: pos for pos, item in enumerate(perm)}
        best = max(best, sum(rank[w] < rank[l] for w, l in pairs) / len(pairs))
    return best


def _fit(n, kind, dim=1, steps=400, seed=0):
    torch.manual_seed(seed)
    emb = torch.nn.Parameter(torch.randn(n, dim))
    opt = torch.optim.Adam([emb], lr=0.05)
    w, l = map(torch.tensor, zip(*_tournament(n), strict=True))
    for _ in range(steps):
        loss = (
            gpm_loss(emb[w], emb[l], tau=0.1).mean()
            if kind == "gpm"
            else bt_reward_loss(emb[w, 0], emb[l, 0]).mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        if kind == "gpm":
            v = torch.nn.functional.normalize(emb, dim=-1)
            p = torch.sigmoid(gpm_score(v[w], v[l]) / 0.1)
        else:
            p = torch.sigmoid(emb[w, 0] - emb[l, 0])
    return p, float(loss.detach())


@pytest.mark.parametrize("n,dim", [(3, 2), (5, 4)])
def test_gpm_embeddings_fit_a_cycle_bt_cannot(n, dim):
    p_gpm, loss_gpm = _fit(n, "gpm", dim)
    p_bt, loss_bt = _fit(n, "bt")
    assert (p_gpm > 0.5).all() and p_gpm.mean() > 0.95  # every pair right, confidently
    assert loss_gpm < 0.1
    # BT's optimum on a regular tournament: all rewards equal, P = ½ on every pair (chance), loss ln 2.
    assert torch.allclose(p_bt, torch.full_like(p_bt, 0.5), atol=0.02)
    assert loss_bt == pytest.approx(math.log(2), abs=1e-3)
    # And no scalar reward at all can order more than this share of the pairs right.
    assert _best_scalar_accuracy(n) <= 2 / 3 + 1e-9 if n == 3 else _best_scalar_accuracy(n) < 1.0


def test_cyclic_pairs_are_a_cycle():
    rows = cyclic_pairs()
    beats = {(r["chosen"].strip(), r["rejected"].strip()) for r in rows}
    assert beats == {("paper", "rock"), ("scissors", "paper"), ("rock", "scissors")}
    with pytest.raises(ValueError):
        cyclic_pairs(("a", "b"))


def _train(tmp_path, loss, data, **kw):
    from preftune.reward import RewardConfig, train_reward

    cfg = RewardConfig(
        model=str(tmp_path / "tiny"),
        data=str(data),
        eval_data=str(data),
        loss=loss,
        output=str(tmp_path / loss),
        batch_size=3,
        max_steps=kw.pop("max_steps", 60),
        learning_rate=kw.pop("learning_rate", 1e-2),
        warmup_ratio=0.0,
        scheduler="constant",
        max_length=32,
        max_prompt_length=16,
        progress=False,
        plot=False,
        eval_fraction=0,
        **kw,
    )
    return train_reward(cfg)


def test_end_to_end_tiny_model_gpm_fits_rps_bt_does_not(tmp_path):
    from preftune.reward import load_preference_model
    from preftune.reward.synthetic import write_jsonl
    from preftune.testing import save_tiny_model, tiny_tokenizer

    save_tiny_model(tmp_path / "tiny")
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token  # as SmolLM2: the head pools at the last token before EOS
    tok.save_pretrained(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "rps.jsonl", cyclic_pairs())
    # k = 3 blocks: with one block, a start in the wrong orientation must pass through collinear
    # embeddings (s = 0 for every pair, a stationary point of a cyclic set) to flip.
    gpm = _train(tmp_path, "rm_gpm", data, gpm_dim=6, learning_rate=3e-3, max_steps=20)
    bt = _train(tmp_path, "rm_bt", data, max_steps=20)
    acc = lambda r: [m for m in r.metrics if "eval/rewards/accuracies" in m][-1]["eval/rewards/accuracies"]  # noqa: E731
    assert acc(gpm) == 1.0
    assert acc(bt) <= 2 / 3 + 1e-9

    # The saved GPM model reproduces the cycle through the public API, and P(a ≻ b) = 1 − P(b ≻ a).
    rm = load_preference_model(gpm.model_dir)
    assert rm.kind == "gpm" and rm.meta["k"] == 3
    rock, paper, scissors = (" " + x for x in RPS)
    for w, lo in ((paper, rock), (scissors, paper), (rock, scissors)):
        p = rm.prefer("Pick one:", w, lo)
        assert p > 0.5
        assert rm.prefer("Pick one:", lo, w) == pytest.approx(1 - p, abs=1e-5)
    with pytest.raises(TypeError):
        rm.score("Pick one:", [rock])
