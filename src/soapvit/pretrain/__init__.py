"""Pre-training of native ViTs: masked image modelling (SimMIM-style, MAE, SemanticMIM with
pixel or HOG targets, and iBOT: DINO plus masked patch distillation), supervised
classification and DINO; trainer with checkpoint/resume and export to zoo backbones."""

from .trainer import (
    MIM_OBJECTIVES,
    OBJECTIVES,
    TrainConfig,
    TrainResult,
    build_objective,
    export_backbone,
    load_checkpoint,
    train,
)

__all__ = [
    "MIM_OBJECTIVES", "OBJECTIVES", "TrainConfig", "TrainResult", "build_objective", "export_backbone",
    "load_checkpoint", "train",
]
