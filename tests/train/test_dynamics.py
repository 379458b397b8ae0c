"""Training dynamics (train/dynamics.py): the gradient split against separate backward passes, the probe's
displacement against an independent scoring, the rows that carry them, and a trajectory they leave alone."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from preftune.losses import get
from preftune.testing import write_data_for
from preftune.train import dynamics
from preftune.train.config import TrainConfig
from preftune.train.outputs import read_metrics
from preftune.train.trainer import build_runner, train

DELTAS = ("chosen_logp_delta", "chosen_token_logp_delta", "rejected_logp_delta", "rejected_token_logp_delta",
          "unseen_logp_delta", "unseen_token_logp_delta")


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), loss="dpo", max_steps=2, batch_size=4,
                learning_rate=1e-2, warmup_ratio=0.0, progress=False, plot=False, save_model=False,
                ref_cache_dir=str(out) + "-refcache", dynamics_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hidden_and_logps(model, prompt: list[int], response: list[int]):
    """Plain HF forward of prompt + response alone: (final hidden states (L, H), response log-prob sum)."""
    ids = torch.tensor([prompt + response])
    hidden = model.model(input_ids=ids).last_hidden_state[0]  # (L, H)
    logp = model.lm_head(hidden).log_softmax(-1)  # (L, V)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return hidden, logp[pos, torch.tensor(response)].sum()


# ------------------------------------------------------------------------------------------ pure parts


def test_hidden_grad_sq_is_the_hand_formula():
    # ∂ log softmax(Wh)[y] / ∂h = Wᵀ(e_y − softmax(Wh)), so the row's value is g² ‖Wᵀ(e_y − p)‖².
    gen = torch.Generator().manual_seed(0)
    h, W = torch.randn(5, 3, generator=gen), torch.randn(7, 3, generator=gen)
    y, g = torch.tensor([0, 6, 2, 2, 5]), torch.tensor([-0.5, 0.25, 0.0, 2.0, 1.0])
    p = (h.double() @ W.double().T).softmax(-1)
    want = (g.double()[:, None] * ((torch.eye(7, dtype=torch.float64)[y] - p) @ W.double())).pow(2).sum(-1)
    got = dynamics.hidden_grad_sq(h, g, y, W, chunk=2)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got[2] == 0.0  # no weight, no gradient
    # A logit transform z -> 2z (as Cohere's logit_scale): the head is 2W, through autograd.
    p2 = (2 * h.double() @ W.double().T).softmax(-1)
    want2 = (g.double()[:, None] * ((torch.eye(7, dtype=torch.float64)[y] - p2) @ (2 * W.double()))).pow(2).sum(-1)
    got2 = dynamics.hidden_grad_sq(h, g, y, W, post=lambda z: 2 * z, chunk=3)
    assert torch.allclose(got2.double(), want2, rtol=1e-5, atol=1e-7)


def test_due_steps():
    # every 4 steps and the last, when the row is logged at all
    assert [s for s in range(1, 11) if dynamics.due(s, 10, 4, 1)] == [4, 8, 10]
    assert [s for s in range(1, 11) if dynamics.due(s, 10, 4, 3)] == [10]  # 4 and 8 are not logged
    assert [s for s in range(1, 11) if dynamics.due(s, 10, 2, 4)] == [4, 8, 10]


def test_roles_of_each_data_shape():
    assert dynamics.roles_of(get("dpo")) == ("chosen", "rejected")
    assert dynamics.roles_of(get("tpo")) == ("chosen", "rejected")
    assert dynamics.roles_of(get("kto")) == ("desirable", "undesirable")
    assert dynamics.roles_of(get("pro")) is None
    assert dynamics.response_roles(get("tpo"), 3) == ["chosen", "rejected", "gold"]
    assert dynamics.response_roles(get("kto"), 1, [False]) == ["undesirable"]
    valid = torch.tensor([[True], [True], [False]])
    labels = torch.tensor([[True], [False], [True]])
    assert dynamics.role_grid(get("kto"), valid, labels).tolist() == [[0], [1], [-1]]


def test_displacement_means_per_role():
    roles, lengths = ["chosen", "rejected", "chosen"], [2, 4, 5]
    got = dynamics.displacement(roles, lengths, [-10.0, -20.0, -30.0], [-9.0, -24.0, -35.0])
    assert got["dynamics/chosen_logp_delta"] == pytest.approx((1 - 5) / 2)
    assert got["dynamics/chosen_token_logp_delta"] == pytest.approx((1 / 2 - 5 / 5) / 2)
    assert got["dynamics/rejected_logp_delta"] == pytest.approx(-4.0)
    assert got["dynamics/rejected_token_logp_delta"] == pytest.approx(-1.0)


def test_off_under_fsdp2_and_deepspeed_with_the_reason():
    assert dynamics.unsupported_reason("single") is None and dynamics.unsupported_reason("ddp") is None
    printed = []
    for kind in ("fsdp2", "deepspeed"):
        runner = SimpleNamespace(cfg=SimpleNamespace(dynamics=True), forward=SimpleNamespace(obj=get("dpo")),
                                 kind=kind, acc=SimpleNamespace(print=printed.append))
        assert dynamics.start(runner, resumed=False) is None
    assert len(printed) == 2 and "fsdp2" in printed[0] and "deepspeed" in printed[1] and "collective" in printed[0]


# ------------------------------------------------------------------------------------------ in a run


def test_gradient_split_equals_separate_backward_passes(tiny_model_dir, pairs_file, tmp_path):
    beta = 0.1
    runner = build_runner(_cfg(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=1, beta=beta,
                               dynamics_probe=0))
    assert runner.base_engine.shares_prefix()  # the chosen and rejected first tokens share a hidden state
    (idx,), _ = runner.step_micro_batches(0)
    runner.run()
    row = runner.history[0]

    # Independently: chosen and rejected each in their own forward, so ∂L/∂H of a chosen forward is the
    # gradient through the chosen log-prob alone. Step 0: the reference is the policy itself.
    model = _load(tiny_model_dir)
    losses, h_c, h_r, margins = [], [], [], []
    for i in idx:
        e = runner.train_set.examples[i]
        hc, lc = _hidden_and_logps(model, e.prompt_ids, e.response_ids[0])
        hr, lr = _hidden_and_logps(model, e.prompt_ids, e.response_ids[1])
        rho = (lc - lc.detach()) - (lr - lr.detach())
        losses.append(-torch.nn.functional.logsigmoid(beta * rho))
        h_c.append(hc)
        h_r.append(hr)
        margins.append(float((lr - lc).detach()))
    grads = torch.autograd.grad(torch.stack(losses).sum(), h_c + h_r)
    sq_c = sum(g.pow(2).sum() for g in grads[: len(idx)])
    sq_r = sum(g.pow(2).sum() for g in grads[len(idx) :])
    assert row["dynamics/hidden_grad_ratio"] == pytest.approx(float((sq_c / sq_r).sqrt()), rel=1e-4)
    # DPO at a zero margin: ∂ℓ/∂logπ_c = −βσ(0), ∂ℓ/∂logπ_r = +βσ(0); the paper's ratio is π_r/π_c.
    assert row["dynamics/dL_dlogp_chosen"] == pytest.approx(-beta / 2, abs=1e-6)
    assert row["dynamics/dL_dlogp_rejected"] == pytest.approx(beta / 2, abs=1e-6)
    assert row["dynamics/log_dL_dprob_ratio"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)


def test_displacement_is_zero_at_step_0_and_equals_an_independent_scoring(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "o", max_steps=3, dynamics_steps=3, dynamics_probe=6,
               dynamics_unseen=4, dynamics_unseen_tokens=12)
    runner = build_runner(cfg)
    first = dynamics.start(runner, resumed=False)
    at_zero = first.measure(runner)
    assert {k: at_zero[f"dynamics/{k}"] for k in DELTAS} == dict.fromkeys(DELTAS, 0.0)

    runner.run()
    rows = runner.history
    assert [("dynamics/chosen_logp_delta" in r) for r in rows] == [False, False, True]
    probe = json.loads((tmp_path / "o" / dynamics.PROBE_FILE).read_text())
    unseen = [rs[-1] for rs in probe["response_ids"][:4]]
    assert all(1 <= len(u) <= 12 for u in unseen) and sum(len(rs) for rs in probe["response_ids"]) == 6 * 2 + 4

    # Plain HF forwards of the initial and the trained weights, one sequence at a time.
    before, after = _load(tiny_model_dir), runner.base_engine.model.eval()
    examples = runner.train_set.examples[:6]
    with torch.no_grad():
        for role, responses in (("chosen", [(e.prompt_ids, e.response_ids[0]) for e in examples]),
                                ("rejected", [(e.prompt_ids, e.response_ids[1]) for e in examples]),
                                ("unseen", list(zip(probe["prompt_ids"][:4], unseen)))):
            d = [float(_hidden_and_logps(after, p, r)[1] - _hidden_and_logps(before, p, r)[1]) for p, r in responses]
            lengths = [len(r) for _, r in responses]
            assert rows[-1][f"dynamics/{role}_logp_delta"] == pytest.approx(sum(d) / len(d), abs=1e-4)
            assert rows[-1][f"dynamics/{role}_token_logp_delta"] == pytest.approx(
                sum(x / n for x, n in zip(d, lengths)) / len(d), abs=1e-5)
    assert rows[-1]["dynamics/rejected_logp_delta"] < rows[-1]["dynamics/chosen_logp_delta"]  # DPO separates them


def test_rows_carry_dynamics_at_the_interval_and_leave_the_trajectory_alone(tiny_model_dir, pairs_file, tmp_path):
    # LoRA with its dropout on, grad accumulation and a precomputed reference: a probe that drew from the
    # RNG, left the model in eval mode or touched a weight would change the losses.
    common = dict(max_steps=5, batch_size=2, grad_accum=2, lora=True, lora_dropout=0.2, disable_dropout=False,
                  dynamics_steps=2, logging_steps=1)
    on = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "on", **common))
    off = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "off", dynamics=False, **common))
    rows_on = read_metrics(tmp_path / "on" / "metrics.jsonl")
    rows_off = read_metrics(tmp_path / "off" / "metrics.jsonl")
    assert [r["step"] for r in rows_on if "dynamics/hidden_grad_ratio" in r] == [2, 4, 5]  # every 2, and the last
    assert [r["step"] for r in rows_on if "dynamics/unseen_logp_delta" in r] == [2, 4, 5]
    assert not any(k.startswith("dynamics/") for r in rows_off for k in r)
    assert not (tmp_path / "off" / dynamics.PROBE_FILE).exists()
    for a, b in zip(rows_on, rows_off):
        for k in ("loss", "rewards/margins", "grad_norm", "logps/chosen"):
            assert a[k] == b[k], (a["step"], k)
    p_off = dict(off.model.named_parameters())
    for n, p in on.model.named_parameters():
        assert torch.equal(p, p_off[n]), n


@pytest.mark.parametrize("loss", ["kto", "pro"])
def test_objectives_without_pairs_log_what_applies(tiny_model_dir, tmp_path, loss):
    data = write_data_for(loss, tmp_path / "data")
    train(_cfg(tiny_model_dir, data, tmp_path / "o", loss=loss, max_steps=1, dynamics_probe=4, dynamics_unseen=2))
    (row,) = read_metrics(tmp_path / "o" / "metrics.jsonl")
    keys = {k.removeprefix("dynamics/") for k in row if k.startswith("dynamics/")}
    if loss == "kto":  # unpaired: desirable and undesirable by label, one example per response
        assert {"desirable_logp_delta", "undesirable_logp_delta", "dL_dlogp_desirable", "dL_dlogp_undesirable",
                "hidden_grad_ratio", "unseen_logp_delta"} <= keys
        assert row["dynamics/dL_dlogp_desirable"] < 0 < row["dynamics/dL_dlogp_undesirable"]
    else:  # lists: no two sides to compare
        assert {"response_logp_delta", "unseen_logp_delta"} <= keys
        assert not any(k.startswith(("dL_", "hidden_", "chosen")) for k in keys)


def test_resumed_run_reads_the_step_0_probe(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "full", max_steps=4, batch_size=2, save_steps=2,
               dynamics_steps=2, dynamics_probe=4, dynamics_unseen=2)
    train(cfg)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")  # holds checkpoint 2 and the probe
    train(cfg.model_copy(update={"output": str(tmp_path / "resumed"), "resume": True}))
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for k in DELTAS:
        assert resumed[3][f"dynamics/{k}"] == pytest.approx(full[3][f"dynamics/{k}"], rel=1e-4, abs=1e-6), k


# ------------------------------------------------------------------------------------------ two processes


def _launch(nproc: int, model_dir, data, out: Path, batch_size: int) -> list[dict]:
    """This file as the worker (``main`` below), under torch.distributed.run when ``nproc`` > 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    args = [__file__, str(model_dir), str(data), str(out), str(batch_size)]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={port}", *args]
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.slow
def test_distributed_two_processes_log_the_one_process_dynamics(tiny_model_dir, pairs_file, tmp_path):
    # The main process scores the probe alone (no collective the others would wait in); the gradient sums
    # are reduced over both processes, so the global batch gives one process's numbers.
    one = _launch(1, tiny_model_dir, pairs_file, tmp_path / "one", 4)
    two = _launch(2, tiny_model_dir, pairs_file, tmp_path / "two", 2)
    assert [r["step"] for r in two] == [1, 2, 3]
    assert [r["step"] for r in two if "dynamics/hidden_grad_ratio" in r] == [2, 3]
    for k in ("hidden_grad_ratio", "dL_dlogp_chosen", "dL_dlogp_rejected", "log_dL_dprob_ratio", *DELTAS):
        assert two[-1][f"dynamics/{k}"] == pytest.approx(one[-1][f"dynamics/{k}"], rel=1e-4, abs=1e-6), k


def main(model_dir: str, data: str, out: str, batch_size: int) -> None:
    train(TrainConfig(model=model_dir, data=data, output=out, loss="dpo", max_steps=3, batch_size=batch_size,
                      learning_rate=1e-2, warmup_ratio=0.0, progress=False, plot=False, save_model=False,
                      length_grouping=False, ref_cache_dir=out + "-refcache", dynamics_steps=2, dynamics_probe=4,
                      dynamics_unseen=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
