"""Train semantic diffusion autoencoders: ``train(TrainConfig(...)) -> model folder``.

    from semdiff.training import TrainConfig, train
    folder = train(TrainConfig.from_preset("emoji32", out="runs/emoji32"))

or ``semdiff train --preset emoji32 --out runs/emoji32`` (``accelerate launch -m semdiff train ...`` for
several GPUs or nodes). The loop is generic over families; each family contributes a
``TrainingObjective`` (``semdiff.training.objectives``).
"""

from semdiff.training.config import PRESETS, TrainConfig
from semdiff.training.objectives import (OBJECTIVES, Stage, TrainingObjective, get_objective,
                                         register_objective)
from semdiff.training.trainer import Trainer, train

__all__ = ["OBJECTIVES", "PRESETS", "Stage", "TrainConfig", "Trainer", "TrainingObjective", "get_objective",
           "register_objective", "train"]
