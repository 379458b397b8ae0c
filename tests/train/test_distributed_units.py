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
