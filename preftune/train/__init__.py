"""Training: the typed config and the loop (imports stay lazy: accelerate loads only in train())."""

from preftune.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "train"]


def train(cfg: TrainConfig, **kwargs):
    """See ``preftune.train.trainer.train``."""
    from preftune.train.trainer import train as _train

    return _train(cfg, **kwargs)
