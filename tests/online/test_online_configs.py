"""Every online algorithm has a recipe in configs/online/, it parses, and it says what the defaults are."""

from pathlib import Path

import pytest

from preftune.online.algorithms import get_algorithm, names
from preftune.online.config import OnlineConfig
from preftune.train.config import load_config

ONLINE = Path(__file__).resolve().parents[2] / "configs" / "online"


def test_one_recipe_per_algorithm():
    assert sorted(p.stem for p in ONLINE.glob("*.yaml")) == sorted(names())


@pytest.mark.parametrize("name", names())
def test_recipe_parses_and_matches_the_algorithm_defaults(name):
    cfg = load_config(ONLINE / f"{name}.yaml", {}, model=OnlineConfig)
    default = OnlineConfig(algorithm=name, task=cfg.task)  # a recipe may pick the task its method needs
    assert cfg.algorithm == name
    got, want = cfg.summary(), default.summary()
    for key in ("k", "temperature", "top_p", "rule", "ref_mode", "loss", "loss_params", "epochs", "judge"):
        assert got[key] == pytest.approx(want[key]) if isinstance(want[key], float) else got[key] == want[key], key
    assert get_algorithm(name).loss == got["loss"]


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown online algorithm"):
        OnlineConfig(algorithm="spo")
    with pytest.raises(ValueError, match="not a paired policy objective"):
        OnlineConfig(loss="kto")
    with pytest.raises(ValueError, match="unknown pair rule"):
        OnlineConfig(rule="best")
    with pytest.raises(ValueError, match="extrapolated"):
        OnlineConfig(ref_mode="extrapolated")


@pytest.mark.parametrize("algorithm", ["sppo", "online_dpo", "iterative_dpo"])
def test_heldout_decoding_is_the_same_for_every_algorithm(algorithm):
    """Held-out samples use eval_temperature/eval_top_p, not the algorithm's training temperature: SPPO
    trains at 0.7 and online DPO at 1.0, and their success rates must compare."""
    from types import SimpleNamespace

    from preftune.online.evaluate import heldout_generations

    cfg = OnlineConfig(algorithm=algorithm, model="tiny")
    calls = []
    run = SimpleNamespace(cfg=cfg, heldout=["p"], sample=lambda prompts, k, seed, temp, top_p, label:
                          calls.append((k, seed, temp, top_p)) or label)
    heldout_generations(run, 2)
    assert calls == [(2, 1, 0.8, 0.95), (1, 1, 0.0, 1.0)]
    assert cfg.resolved("temperature") == \
        {"sppo": 0.7, "online_dpo": 1.0, "iterative_dpo": 0.8}[algorithm]


@pytest.mark.parametrize(("algorithm", "refused"), [("iterative_dpo", False), ("sppo", False), ("online_dpo", True),
                                                    ("ofs_dpo", True), ("curry_dpo", True), ("mcts_dpo", True)])
def test_algorithms_refused_under_several_processes(algorithm, refused):
    from preftune.online.processes import refusals

    cfg = OnlineConfig(algorithm=algorithm, model="tiny")
    assert refusals(cfg, 1) == []
    why = refusals(cfg, 2)
    assert bool(why) is refused
    assert all(algorithm in w and "run it as one process" in w for w in why)


def test_a_recipe_follows_the_task_it_is_given():
    """`preftune online configs/online/X.yaml --task keyword` judges keyword answers at keyword's answer length
    (a recipe pinned to word_limit's judge and 32 tokens would judge the wrong task and cut most answers)."""
    from preftune.tasks import get_task

    for name in ("iterative_dpo", "sppo", "dno"):
        cfg = load_config(ONLINE / f"{name}.yaml", {"task": "keyword"}, model=OnlineConfig)
        assert cfg.resolved("judge") == "task:keyword"
        assert cfg.max_new_tokens == get_task("keyword").max_new_tokens == 48
    assert OnlineConfig(task="word_limit").max_new_tokens == 32
    assert OnlineConfig(task="arithmetic", algorithm="mcts_dpo").max_new_tokens == 64
    assert OnlineConfig(task="keyword", max_new_tokens=20).max_new_tokens == 20  # a set value wins
    assert OnlineConfig(task="keyword").summary()["max_new_tokens"] == 48
    with pytest.raises(ValueError, match="unknown task"):
        OnlineConfig(task="nope")
