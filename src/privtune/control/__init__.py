"""Controllers: how each method sets clipping thresholds and noise during training."""

from privtune.control.base import Action, Controller, ControllerContext, Observation
from privtune.control.observer import Observer
from privtune.control.registry import (
    CONTROLLERS,
    build_controller,
    controller_class,
    register_controller,
    unregister_controller,
)

__all__ = [
    "CONTROLLERS",
    "Action",
    "Controller",
    "ControllerContext",
    "Observation",
    "Observer",
    "build_controller",
    "controller_class",
    "register_controller",
    "unregister_controller",
]
