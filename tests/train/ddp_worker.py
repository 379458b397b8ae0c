"""Run by test_distributed.py under torch.distributed.run: one optimizer step, gradients saved."""

import sys

import torch

from preftune.train.config import TrainConfig
from preftune.train.trainer import build_runner


def main(model_dir: str, data: str, out: str, batch_size: int, result: str) -> None:
    cfg = TrainConfig(model=model_dir, data=data, output=out, loss="dpo", max_steps=1, batch_size=batch_size,
                      learning_rate=1e-3, warmup_ratio=0.0, progress=False, plot=False, length_grouping=False,
                      max_grad_norm=None, reference="live")
    runner = build_runner(cfg)
    grads = {}
    original = runner.opt.step

    def capture(*a, **k):
        for n, p in runner.base_engine.model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()
        return original(*a, **k)

    runner.opt.step = capture
    metrics = runner.train_step()
    if runner.acc.is_main_process:
        torch.save({"grads": grads, "metrics": metrics, "world": runner.acc.num_processes}, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    from preftune.train.distributed import end_launch

    end_launch(0)  # as the CLI ends a launched process (a teardown abort would fail the launch)
