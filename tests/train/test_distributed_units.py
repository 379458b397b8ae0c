"""The single-process parts of multi-process training (train/distributed.py, sharded checkpoints,
gathered saves): what is refused and why, and the plain copy a gathered model is saved from."""

import pytest
import torch

from preftune.losses import get
from preftune.train import distributed
from preftune.train.config import TrainConfig
from preftune.train.trainer import make_accelerator


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model="m", data="d.jsonl", **kw)


def test_refusals_under_fsdp2_name_the_reason():
    cfg = _cfg(loss="tdpo1", compile=True)
    assert distributed.refusals(cfg, get("tdpo1"), "ddp") == []
    why = distributed.refusals(cfg, get("tdpo1"), "fsdp2")
    assert len(why) == 2 and "LM head" in why[0] and "compile" in why[1]
    assert distributed.refusals(_cfg(loss="dpo"), get("dpo"), "fsdp2") == []


def test_refusals_under_deepspeed_name_the_reason():
    dpo = get("dpo")
    assert distributed.refusals(_cfg(reference="live"), dpo, "deepspeed", 2) == []  # ZeRO-2: weights replicated
    why = distributed.refusals(_cfg(reference="live", save_steps=5), dpo, "deepspeed", 3)
    assert len(why) == 2 and "checkpoints" in why[0] and "reference=precompute" in why[1]
    assert distributed.refusals(_cfg(resume=True), dpo, "deepspeed", 2)[0].startswith("checkpoints")
    assert distributed.refusals(_cfg(lora=True, reference="live"), dpo, "deepspeed", 3) == []
    assert distributed.refusals(_cfg(reference="precompute"), dpo, "deepspeed", 3) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "mixed_precision: bf16"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP2 only"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
         "gradient_checkpointing"),
    ],
)
def test_launches_preftune_does_not_run_are_refused(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        make_accelerator(mixed_precision="no", cpu=True)


def test_single_process_is_single(monkeypatch):
    acc = make_accelerator(mixed_precision="no", cpu=True)
    assert distributed.kind(acc) == "single"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # agrees with --precision bf16: accepted
    assert make_accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"


def test_sharded_checkpoint_resumes_only_under_the_same_sharding(tmp_path):
    import json

    from preftune.train import checkpoint as ckpt

    folder = tmp_path / "checkpoint-0000002"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2, "shards": 2}))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = dict(model=model, optimizer=opt, scheduler=sched, loss_state=None, process_index=0)
    with pytest.raises(ValueError, match="an FSDP2 run of 2 processes; this is an unsharded run"):
        ckpt.load_checkpoint(folder, **kw)
    with pytest.raises(ValueError, match="an FSDP2 run of 2 processes; this is an FSDP2 run of 4 processes"):
        ckpt.load_checkpoint(folder, shards=4, **kw)


@pytest.mark.parametrize("lora", [False, True])
def test_unsharded_copy_holds_the_given_weights(lora):
    from preftune.model import LoraSettings, apply_lora, unsharded_copy
    from preftune.testing import tiny_model

    model = tiny_model("llama")
    if lora:
        model = apply_lora(model, LoraSettings(r=2))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}  # as if gathered from the shards
    copy = unsharded_copy(model, state)
    assert type(copy) is type(model) and copy is not model
    got = copy.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    # Buffers a state dict leaves out (rotary frequencies) come from the model.
    base = copy.get_base_model() if lora else copy
    ref = model.get_base_model() if lora else model
    assert torch.equal(base.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(copy(input_ids=ids).logits).all()


def test_every_process_runs_as_many_micro_batches_and_each_example_once():
    """split_step: a process short of examples in a step (the last of an epoch) gets empty stand-ins, so every
    process runs process 0's number of micro-batches (collectives pair up), and the real ones hold each of
    the step's examples exactly once."""
    from preftune.train.loop import split_step

    steps = [(7, 2, 2, 2), (3, 2, 1, 2), (1, 2, 1, 1), (3, 4, 1, 1), (8, 2, 2, 2), (6, 1, 4, 2)]
    for n, world, bs, accum in steps:  # n examples: at most one global step, world × bs × accum
        idx = list(range(100, 100 + n))
        parts = [split_step(idx, r, world, bs, accum) for r in range(world)]
        assert len({len(p) for p in parts}) == 1, (n, world, parts)
        real = [i for p in parts for m in p for i in m]
        assert sorted(real) == idx and all(len(m) <= bs for p in parts for m in p)
    assert split_step(list(range(3)), 1, 2, 1, 2) == [[2], []]  # process 1 of a 3-example step: one stand-in
    assert split_step(list(range(4)), 0, 1, 2, 2) == [[0, 1], [2, 3]]  # one process: as before


def test_online_refuses_sharded_launches_and_loops_of_their_own(monkeypatch):
    from preftune.online.config import OnlineConfig
    from preftune.online.processes import refusals

    cfg = OnlineConfig.quick()
    assert refusals(cfg, 2) == []
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "not run under FSDP2" in refusals(cfg, 1)[0] and "ddp.yaml" in refusals(cfg, 2)[0]
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "not run under DeepSpeed" in refusals(cfg, 2)[0]
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    for alg, why in [("online_dpo", "one optimizer step per batch"), ("ofs_dpo", "loop of its own"),
                     ("curry_dpo", "not tested")]:
        assert refusals(OnlineConfig.quick(algorithm=alg), 1) == []
        assert why in refusals(OnlineConfig.quick(algorithm=alg), 2)[0]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    from preftune.online.loop import OnlineRun

    with pytest.raises(ValueError, match="not run under FSDP2"):
        OnlineRun(cfg)


def test_online_resume_needs_as_many_processes(tmp_path):
    """batch_size is per process: a run resumed under another number of processes would train on another
    global batch, so the number is recorded and checked (a run from before it was recorded ran one)."""
    import json

    from preftune.online.config import OnlineConfig
    from preftune.online.loop import OnlineRun

    run = OnlineRun(OnlineConfig.quick(output=str(tmp_path), resume=True))
    path = tmp_path / "online_config.json"
    summary = {**run.cfg.summary(), "output": str(tmp_path)}
    path.write_text(json.dumps({k: v for k, v in summary.items() if k != "processes"}))  # an older run's
    run._check_output(path, {**summary, "processes": 1})
    with pytest.raises(ValueError, match=r"other settings \(processes\)"):
        run._check_output(path, {**summary, "processes": 2})
