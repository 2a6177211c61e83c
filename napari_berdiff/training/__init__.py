"""Training loops and their recipes (torch only; no Qt, no napari)."""

from .config import TrainConfig, condition_once_network, default_diffusion, default_network
from .ema import EMA
from .trainer import (
    TrainResult,
    export_model,
    log_path_for,
    segmentor_predict,
    state_path_for,
    train,
)
from .refiner import segmentor_file_for, train_refiner

__all__ = [
    "EMA",
    "TrainConfig",
    "TrainResult",
    "default_diffusion",
    "default_network",
    "condition_once_network",
    "export_model",
    "log_path_for",
    "segmentor_file_for",
    "segmentor_predict",
    "state_path_for",
    "train",
    "train_refiner",
]
