"""Registry of controllers by method name: adding a method is registering a class."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from privtune.control.base import Controller, ControllerContext
from privtune.errors import ConfigError

CONTROLLERS: dict[str, type[Controller]] = {}


def register_controller(name: str, *, force: bool = False) -> Callable[[type], type]:
    def decorate(cls: type[Controller]) -> type[Controller]:
        if name in CONTROLLERS and not force:
            raise ValueError(f"controller '{name}' is already registered")
        cls.name = name
        CONTROLLERS[name] = cls
        return cls

    return decorate


def controller_class(method: str, entry: str | None = None) -> type[Controller]:
    _load_builtin()
    if method not in CONTROLLERS:
        raise ConfigError(
            f"methods.{entry or method}",
            f"unknown method '{method}'",
            f"choose one of: {', '.join(sorted(CONTROLLERS))}",
        )
    return CONTROLLERS[method]


def build_controller(
    method: str, ctx: ControllerContext, options: dict[str, Any], entry: str | None = None
) -> Controller:
    """Instantiate a controller, turning bad options into errors that name the field."""
    cls = controller_class(method, entry)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "ctx"}
    for key in options:
        if key not in accepted:
            raise ConfigError(
                f"methods.{entry or method}.{key}",
                f"unknown option for method '{method}'",
                f"use one of: {', '.join(sorted(accepted)) or '(no options)'}",
            )
    try:
        return cls(ctx, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"methods.{entry or method}", str(err), "correct the option") from None


def _load_builtin() -> None:
    # Import for the registration side effect; kept lazy to avoid an import cycle.
    from privtune.control import adaptive, fixed, lmo, per_sample, rldp, schedules  # noqa: F401
