"""Inputs the trainer computes for objectives (preftune/train/inputs.py), checked against direct computations."""

import pytest
import torch

from preftune.testing import tiny_model, write_unpaired_jsonl
from preftune.train.config import TrainConfig
from preftune.train.trainer import build_runner

# Not in dataset order, so a pairing by dataset position (TRL's, fixed before batching) would give other pairs.
MICRO_BATCH = [5, 2, 7, 0]


def _direct_logps(model, prompt: list[int], completion: list[int]) -> float:
    """Summed log-prob of ``completion`` after ``prompt``: one unpadded HF forward, no preftune engine."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0].float().log_softmax(-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)  # positions predicting the completion
    return float(logps[pos, torch.tensor(completion)].sum())


def test_kto_kl_baseline_uses_the_mismatched_pairs_of_the_micro_batch(tiny_model_dir, tmp_path):
    data = write_unpaired_jsonl(tmp_path / "kto.jsonl", n=8)
    cfg = TrainConfig(
        model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"), loss="kto",
        batch_size=len(MICRO_BATCH), precision="fp32", progress=False, plot=False, ref_cache_dir=str(tmp_path / "rc"),
    )
    runner = build_runner(cfg)
    assert runner.ref_mode == "live"
    # The frozen reference is a copy of the policy, so kl_logps == ref_kl_logps and z0 = 0 would pass for any
    # pairing; a different reference makes both the values and z0 informative.
    runner.ref_model = tiny_model("llama", seed=1).eval()
    examples = [runner.train_set.examples[i] for i in MICRO_BATCH]
    assert len({bool(e.inputs["labels"][0]) for e in examples}) == 2  # desirable and undesirable mixed
    n = len(examples)

    means = []
    for swap in (False, True):
        if swap:
            # Policy and reference exchanged: mean(kl − ref_kl) changes sign, so one of the two runs is clamped.
            runner.base_engine.model.load_state_dict(tiny_model("llama", seed=1).state_dict())
            runner.ref_model = tiny_model("llama", seed=0).eval()
        result, policy, _ = runner.forward_loss(runner.train_set, MICRO_BATCH, grad=True)
        # Prompt i with the completion of example i − 1 (mod B) of this micro-batch, in micro-batch order.
        pairs = [(examples[i].prompt_ids, examples[(i - 1) % n].response_ids[0]) for i in range(n)]
        want_kl = torch.tensor([_direct_logps(runner.base_engine.model, p, c) for p, c in pairs])
        want_ref = torch.tensor([_direct_logps(runner.ref_model, p, c) for p, c in pairs])
        kl, ref_kl = policy.inputs["kl_logps"], policy.inputs["ref_kl_logps"]
        torch.testing.assert_close(kl.cpu(), want_kl, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ref_kl.cpu(), want_ref, rtol=1e-5, atol=1e-4)
        # The matched pairs give other values: the check above does see which completion was used.
        matched = torch.tensor([_direct_logps(runner.base_engine.model, e.prompt_ids, e.response_ids[0])
                                for e in examples])
        assert (kl.cpu() - matched).abs().max() > 1e-2
        # Policy side under no_grad (as TRL), even though this forward builds a graph for the loss.
        assert not kl.requires_grad and policy.logps.requires_grad

        z0 = result.metrics["kl"]
        assert not z0.requires_grad
        # Exactly the formula on the trainer's own inputs; against the direct values only to their float32
        # summation error (engine and direct forward sum ~50 log-probs in different orders).
        assert float(z0) == pytest.approx(max(float((kl - ref_kl).mean()), 0.0), abs=1e-6)
        mean = float((want_kl - want_ref).mean())
        assert float(z0) == pytest.approx(max(mean, 0.0), abs=1e-4)
        means.append(mean)
    # The exchange flips the sign (so exactly one run exercises the clamp), well clear of the 1e-4 tolerance.
    assert means[0] == pytest.approx(-means[1], abs=1e-4) and abs(means[0]) > 1e-2


def test_kto_refuses_a_micro_batch_of_one(tiny_model_dir, tmp_path):
    # One example would be paired with its own completion, so z0 = max(0, ρ) would not be a KL baseline.
    data = write_unpaired_jsonl(tmp_path / "kto.jsonl", n=4)
    with pytest.raises(ValueError, match="kto.*batch_size must be at least 2"):
        TrainConfig(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"), loss="kto", batch_size=1)
