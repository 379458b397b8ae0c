"""FSDP2 on CPU processes (gloo), launched as a user launches it: ``accelerate launch --config_file
configs/accelerate/fsdp2.yaml``. Two processes give the same loss and the same (gathered) gradients as
one unsharded process on the same global batch; a sharded run that is killed and resumed follows the
uninterrupted run, and its final model is a plain folder ``from_pretrained`` loads."""

import json
from pathlib import Path

import pytest
import torch
from launching import assert_same_step, launch, one_step, tiny_cfg  # tests/train/launching.py

pytestmark = pytest.mark.slow


def test_fsdp2_full_finetune_two_processes_equal_one(tiny_model_dir, pairs_file, tmp_path):
    # A live reference: the frozen copy is sharded too. Two micro-batches per step: FSDP2's gradient sync
    # is skipped on the first and must still add up to the one-process gradient.
    cfg = dict(reference="live", grad_accum=2)
    one = one_step(None, 1, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o1", 2, **cfg), tmp_path / "one.pt")
    two = one_step("fsdp2", 2, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o2", 1, **cfg), tmp_path / "two.pt")
    assert (one["world"], one["kind"]) == (1, "single")
    assert (two["world"], two["kind"]) == (2, "fsdp2")
    # Each decoder layer is its own unit and the engine the root, for the policy and the frozen reference.
    layers = ["FSDPLlamaDecoderLayer"] * 2
    assert sorted(two["units"]) == sorted(["FSDPLogProbEngine", *layers]) == sorted(two["ref_units"])
    assert one["units"] == [] and one["ref_units"] == []
    assert_same_step(one, two)


def test_fsdp2_lora_two_processes_equal_one(tiny_model_dir, pairs_file, tmp_path):
    # The reference is the base with the adapter off, precomputed across the processes: the cache file is
    # written once (by one process), and both runs' reference log-probs agree. Activation checkpointing
    # (preftune's gradient_checkpointing) recomputes each sharded layer, gathered again, in the backward.
    cfg = dict(lora=True, lora_r=4, reference="precompute", gradient_checkpointing=True)
    one = one_step(None, 1, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o1", 4, ref_cache_dir=str(tmp_path / "c1"),
                                 **cfg), tmp_path / "one.pt")
    two = one_step("fsdp2", 2, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o2", 2,
                                    ref_cache_dir=str(tmp_path / "c2"), **cfg), tmp_path / "two.pt")
    assert two["kind"] == "fsdp2" and "FSDPLlamaDecoderLayer" in two["units"]
    assert two["cache_writes"] == [1, 0] and len(list((tmp_path / "c2").iterdir())) == 1
    assert all("lora_" in n for n in two["grads"]) and len(two["grads"]) == 2 * 7 * 2  # layers × modules × (A, B)
    assert_same_step(one, two)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def test_fsdp2_killed_and_resumed_run_follows_the_uninterrupted_run(tiny_model_dir, pairs_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def args(out: Path, batch_size: int, cache: Path) -> list[str]:
        sets = dict(warmup_ratio=0.0, progress="false", plot="false", length_grouping="false", save_steps=2,
                    eval_steps=2, reference="precompute", ref_cache_dir=str(cache))
        return ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--eval-data", str(pairs_file),
                "-o", str(out),
                "--max-steps", "4", "--batch-size", str(batch_size), "--learning-rate", "1e-3",
                *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]

    # The uninterrupted run: one unsharded process, the plain command line.
    launch(None, 1, *args(tmp_path / "one", 4, tmp_path / "c1"), module=True)
    # The sharded run: killed right after its step-2 checkpoint, then resumed with the documented command.
    spec = {"mode": "crash", "crash_after": 2, "result": "",
            "config": tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "two", 2, max_steps=4, save_steps=2,
                               max_grad_norm=1.0, reference="precompute", ref_cache_dir=str(tmp_path / "c2"),
                               eval_data=str(pairs_file), eval_steps=2)}
    killed = launch("fsdp2", 2, json.dumps(spec), check=False)
    assert killed.returncode != 0
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-0000002"
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert shards == ["model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
                      "optim-00000-of-00002.safetensors", "optim-00001-of-00002.safetensors"]
    # Each process wrote its own half of every weight (FSDP2 shards dim 0).
    rows = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.embed_tokens.weight.shape[0]
    halves = [load_file(str(ckpt / f"model-0000{i}-of-00002.safetensors"))["model.embed_tokens.weight"] for i in (0, 1)]
    assert [h.shape[0] for h in halves] == [(rows + 1) // 2, rows // 2]
    assert [r["step"] for r in _metrics(tmp_path / "two")] == [1, 2]
    cache_files = list((tmp_path / "c2").iterdir())
    assert len(cache_files) == 1
    written = cache_files[0].stat().st_mtime_ns

    resumed = launch("fsdp2", 2, *args(tmp_path / "two", 2, tmp_path / "c2"), "--resume", module=True)
    assert "resumed from" in resumed.stdout and "reference log-probs: cache hit" in resumed.stdout
    assert cache_files[0].stat().st_mtime_ns == written  # reused, not written again

    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [("eval/loss" in r) for r in two] == [False, True, False, True]  # evaluated sharded, every 2 steps
    for a, b in zip(one, two):
        for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "lr",
                  *(("eval/loss", "eval/rewards/margins") if "eval/loss" in a else ())):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    # The final model: a plain folder, gathered from the shards, equal to the unsharded run's.
    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for n in s1:
        assert torch.allclose(s1[n], s2[n], atol=1e-5, rtol=1e-4), n
    assert not torch.equal(s2["lm_head.weight"], AutoModelForCausalLM.from_pretrained(tiny_model_dir).lm_head.weight)
