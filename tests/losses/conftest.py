"""Fixtures of the TRL parity tests (test_trl_parity*.py): the tiny models and TRL trainers built on them."""

import pytest


@pytest.fixture()
def models():
    """(policy, reference, tokenizer): different random tiny Llamas (seeds 0 and 1), so log-ratios are far from 0."""
    from preftune.testing import tiny_model, tiny_tokenizer

    return tiny_model("llama", seed=0).eval(), tiny_model("llama", seed=1).eval(), tiny_tokenizer()


@pytest.fixture()
def trl_trainer(tmp_path):
    """``make(trainer_cls, config_cls, rows, model, tokenizer, ref_model=None, **cfg)``: a TRL trainer whose first
    per-device batch is all of ``rows``, in float32 on CPU."""

    def make(trainer_cls, config_cls, rows, model, tokenizer, ref_model=None, **cfg):
        from datasets import Dataset

        args = config_cls(
            output_dir=str(tmp_path),
            report_to=[],
            use_cpu=True,
            per_device_train_batch_size=len(rows),
            bf16=False,  # TRL's configs default to bf16 autocast, on CPU too; parity is in float32
            **cfg,
        )
        extra = {} if ref_model is None else {"ref_model": ref_model}
        return trainer_cls(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **extra
        )

    return make
