"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU processes (DeepSpeed's CPU accelerator, gloo), launched as a user
launches it: ``accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml``. Two processes
give the same loss, gradients (gathered from DeepSpeed's partitions) and trajectory as one plain process on
the same global batch, and ZeRO-3's final model, gathered, equals the plain run's.

DeepSpeed is not a dependency of preftune: ``pip install deepspeed`` to run these (its first launch builds
DeepSpeed's shared-memory communication op, which takes a C++ compiler and a minute or two)."""

import pytest
import torch
from launching import assert_same_step, one_step, tiny_cfg  # tests/train/launching.py

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def shm_op_built_once():
    # DeepSpeed's CPU comm backend JIT-builds (first time) and loads its shared-memory op in every process as
    # the group forms. In a fresh environment the two workers built it at once and one aborted (SIGABRT, seen
    # in a fresh clone's make test); built here first, the workers only load the finished library.
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()


def test_zero2_two_processes_equal_one(tiny_model_dir, pairs_file, tmp_path):
    # Two micro-batches per step: DeepSpeed must step once, after the second, on their exact sum.
    cfg = dict(reference="precompute", grad_accum=2)
    one = one_step(None, 1, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o1", 2, ref_cache_dir=str(tmp_path / "c1"),
                                 **cfg), tmp_path / "one.pt")
    two = one_step("deepspeed_zero2", 2, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o2", 1,
                                              ref_cache_dir=str(tmp_path / "c2"), **cfg), tmp_path / "two.pt")
    assert (two["world"], two["kind"]) == (2, "deepspeed")
    assert two["cache_writes"] == [1, 0]
    assert_same_step(one, two)


def test_zero3_two_processes_equal_one_and_the_gathered_model_loads(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = dict(reference="precompute", max_steps=3, max_grad_norm=1.0, eval_data=str(pairs_file))
    spec = dict(steps=3, save=True)
    one = one_step(None, 1, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o1", 4, ref_cache_dir=str(tmp_path / "c1"),
                                 **cfg), tmp_path / "one.pt", **spec)
    two = one_step("deepspeed_zero3", 2, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o2", 2,
                                              ref_cache_dir=str(tmp_path / "c2"), **cfg), tmp_path / "two.pt", **spec)
    assert (two["world"], two["kind"]) == (2, "deepspeed")
    assert_same_step(one, two)
    for a, b in zip(one["history"], two["history"]):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert set(two["eval"]) == set(one["eval"]) and "eval/loss" in two["eval"]
    for k, v in one["eval"].items():
        assert two["eval"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    s1 = AutoModelForCausalLM.from_pretrained(one["model_dir"]).state_dict()
    s2 = AutoModelForCausalLM.from_pretrained(two["model_dir"]).state_dict()
    assert s1.keys() == s2.keys()
    for n in s1:
        assert torch.allclose(s1[n], s2[n], atol=1e-5, rtol=1e-4), n


def test_zero3_lora_two_processes_equal_one(tiny_model_dir, pairs_file, tmp_path):
    # The partitioned base with the adapter off is the reference; only the adapters train.
    cfg = dict(lora=True, lora_r=4, reference="precompute")
    one = one_step(None, 1, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o1", 4,
                                     ref_cache_dir=str(tmp_path / "c1"), **cfg), tmp_path / "one.pt")
    two = one_step("deepspeed_zero3", 2, tiny_cfg(tiny_model_dir, pairs_file, tmp_path / "o2", 2,
                                                  ref_cache_dir=str(tmp_path / "c2"), **cfg), tmp_path / "two.pt")
    assert two["kind"] == "deepspeed" and two["cache_writes"] == [1, 0]
    assert all("lora_" in n for n in two["grads"]) and len(two["grads"]) == 2 * 7 * 2  # layers × modules × (A, B)
    assert_same_step(one, two)
