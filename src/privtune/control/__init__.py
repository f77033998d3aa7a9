"""Controllers: how each method sets clipping thresholds and noise during training."""

from privtune.control.base import Action, Controller, ControllerContext, Observation
from privtune.control.registry import CONTROLLERS, build_controller, register_controller

__all__ = [
    "CONTROLLERS",
    "Action",
    "Controller",
    "ControllerContext",
    "Observation",
    "build_controller",
    "register_controller",
]
