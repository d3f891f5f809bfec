"""OSEDiff training (spec §4): `osediff train`, on accelerate.

Modules, one concept each: `config` (frozen dataclasses, the CLI is derived from them), `data` (image sources,
crops, resumable order), `models` (generator, real and fake scores), `losses` (the paper's losses as pure
functions), `loop` (the accelerate loop: step recipe, checkpoints, resume, logging, validation).

Importing this package is light; `from osediff.train.loop import train` loads torch and accelerate.
"""

from osediff.train.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

__all__ = ["DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig"]
