"""The loop's evaluation of stateful objectives, its metrics rows, the safety of resume, and warnings."""

import copy
import json
import math
import warnings

import pytest
import torch

from preftune.testing import write_unpaired_jsonl
from preftune.train.config import TrainConfig
from preftune.train.loop import eval_shard
from preftune.train.outputs import read_metrics
from preftune.train.trainer import build_runner, train


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), loss="dpo", max_steps=2, batch_size=4,
                learning_rate=1e-3, warmup_ratio=0.0, progress=False, plot=False, ref_cache_dir=str(out) + "-refcache")
    base.update(kw)
    return TrainConfig(**base)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_eval_of_bco_uses_the_running_mean_without_updating_it(tiny_model_dir, tmp_path):
    data = write_unpaired_jsonl(tmp_path / "u.jsonl", n=16)
    runner = build_runner(_cfg(tiny_model_dir, data, tmp_path / "o", loss="bco", eval_fraction=0.25, save_model=False))
    state = runner.loss_state
    state.load_state_dict({"mean": 0.7, "count": 10.0})

    metrics = runner.evaluate()
    # Before any step the policy is the reference, so every reward r = βρ is 0 and the loss is
    # −log σ(−δ) = softplus(δ) on desirable and −log σ(δ) = softplus(−δ) on undesirable examples.
    # Evaluated without the state (δ = 0) it would be log 2.
    labels = [bool(e.inputs["labels"][0]) for e in runner.eval_set.examples]
    n_d, n = sum(labels), len(labels)
    assert 0 < n_d < n
    want = (n_d * _softplus(0.7) + (n - n_d) * _softplus(-0.7)) / n
    assert metrics["eval/loss"] == pytest.approx(want, abs=1e-5)
    assert metrics["eval/delta"] == pytest.approx(0.7, abs=1e-6)
    assert (state.mean, state.count, state.training) == (0.7, 10.0, True)  # read, not updated; flag restored

    runner.train_step()  # training folds its rewards in again
    assert state.count == 10.0 + runner.cfg.batch_size


def test_eval_of_beta_dpo_reads_its_statistics_and_leaves_them_and_its_sampler(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "o", loss="beta_dpo", eval_fraction=0.25, save_model=False)
    runner = build_runner(cfg)
    state = runner.loss_state
    state.load_state_dict({**state.state_dict(), "m0": 0.3, "sigma": 0.2, "steps": 5})
    before = copy.deepcopy(state.state_dict())

    metrics = runner.evaluate()
    # Every gap is 0 (to float error) before any step, so β_b = β0·(1 + a·(0 − M0)) = 0.1·(1 − 0.6·0.3),
    # from the running M0 (0.1 with M0 = 0; no β_b at all without the state).
    assert metrics["eval/beta_batch"] == pytest.approx(0.1 * (1 - 0.6 * 0.3), abs=1e-5)
    after = state.state_dict()
    assert {k: after[k] for k in ("m0", "sigma", "steps")} == {k: before[k] for k in ("m0", "sigma", "steps")}
    # What evaluation drew to filter pairs is put back: training samples as if it had not evaluated.
    assert torch.equal(after["generator"], before["generator"]) and state.training


@pytest.mark.parametrize("n, world", [(5, 2), (8, 4), (1, 3), (7, 1)])
def test_eval_shards_are_equal_and_count_every_example_once(n, world):
    shards = [eval_shard(n, world, rank) for rank in range(world)]
    assert len({len(idx) for idx, _ in shards}) == 1  # same micro-batches on every process
    counted = sorted(i for idx, keep in shards for i, k in zip(idx, keep) if k)
    assert counted == list(range(n))
    assert all(0 <= i < n for idx, _ in shards for i in idx)


class _WritesAFile:
    """Unpickling this opens (creates) a file: what a foreign checkpoint could do with a plain torch.load."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_metrics_rows_time_and_resume_refuses_pickled_code(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=3, batch_size=2, save_steps=1, save_model=False)
    train(cfg)
    rows = read_metrics(tmp_path / "o" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    spent = 0.0
    for r in rows:  # the steps are disjoint stretches of the run: elapsed covers all of them so far
        assert r["step_time"] > 0
        spent += r["step_time"]
        assert r["elapsed"] >= spent
    assert rows[0]["elapsed"] < rows[1]["elapsed"] < rows[2]["elapsed"]

    last = tmp_path / "o" / "checkpoints" / "checkpoint-0000002"
    marker = tmp_path / "ran"
    for name in ("optim.pt", "rng_0.pt"):
        original = (last / name).read_bytes()
        torch.save({"optimizer": _WritesAFile(marker)}, last / name)
        with pytest.raises(ValueError, match=rf"{name}: refused to load.*could run code.*io\.open"):
            train(cfg.model_copy(update={"resume": True}))
        assert not marker.exists()
        (last / name).write_bytes(original)

    # The untouched checkpoint resumes onto the same trajectory, and the clock counts on from it.
    train(cfg.model_copy(update={"resume": True}))
    resumed = read_metrics(tmp_path / "o" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for k in ("loss", "rewards/margins", "grad_norm", "lr"):
        assert resumed[2][k] == pytest.approx(rows[2][k], rel=1e-5, abs=1e-7), k
    saved = json.loads((last / "trainer_state.json").read_text())["elapsed"]
    assert resumed[2]["elapsed"] >= saved + resumed[2]["step_time"]


def test_lora_runs_emit_no_deprecation_of_is_gradient_checkpointing(tiny_model_dir, pairs_file, tmp_path):
    from preftune.reward import RewardConfig
    from preftune.reward.trainer import build_reward_runner

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(tiny_model_dir, pairs_file, tmp_path / "p", lora=True, gradient_checkpointing=True, max_steps=1,
                   save_model=False))
        build_reward_runner(RewardConfig(model=str(tiny_model_dir), data=str(pairs_file), output=str(tmp_path / "r"),
                                         lora=True, progress=False, plot=False))
    found = [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert not found, found
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future
