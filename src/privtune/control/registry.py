"""The table of controllers by method name: adding a method is adding a class here (or
registering one from outside with :func:`register_controller`, with its options model).

An explicit table rather than import-time self-registration: every controller module imports
only control.base, so there is no import cycle and no lazy import to break one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from privtune.config import method_options
from privtune.control.adaptive import AdaptiveQuantile
from privtune.control.base import Controller, ControllerContext
from privtune.control.fixed import DPSGD, NonPrivate, PerAdapter
from privtune.control.lmo import LMODP
from privtune.control.per_sample import PSAC, AutoS
from privtune.control.rldp import RLDP
from privtune.control.schedules import DecayingNoise
from privtune.errors import ConfigError
from privtune.options import METHOD_OPTIONS, MethodOptions, NoOptions

CONTROLLERS: dict[str, type[Controller]] = {
    cls.name: cls
    for cls in (
        NonPrivate,
        DPSGD,
        PerAdapter,
        AdaptiveQuantile,
        AutoS,
        PSAC,
        DecayingNoise,
        LMODP,
        RLDP,
    )
}
assert set(CONTROLLERS) == set(METHOD_OPTIONS), "every controller needs its options model"


def register_controller(
    name: str, *, options: type[MethodOptions] = NoOptions, force: bool = False
) -> Callable[[type[Controller]], type[Controller]]:
    """Class decorator adding a controller (and its options model) under ``name``."""

    def decorate(cls: type[Controller]) -> type[Controller]:
        if name in CONTROLLERS and not force:
            raise ValueError(f"controller '{name}' is already registered")
        cls.name = name
        CONTROLLERS[name] = cls
        METHOD_OPTIONS[name] = options
        return cls

    return decorate


def unregister_controller(name: str) -> None:
    CONTROLLERS.pop(name, None)
    METHOD_OPTIONS.pop(name, None)


def controller_class(method: str, entry: str | None = None) -> type[Controller]:
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
    """Instantiate a controller from its typed options; errors name the field."""
    cls = controller_class(method, entry)
    return _naming_the_option(cls, method, options, entry, lambda **typed: cls(ctx, **typed))


def check_controller(
    method: str, ctx: ControllerContext, options: dict[str, Any], entry: str | None = None
) -> None:
    """What the controller would refuse about the plan alone (`Controller.check_plan`),
    before a model is loaded; errors name the field, as `build_controller`'s do."""
    cls = controller_class(method, entry)
    _naming_the_option(cls, method, options, entry, lambda **typed: cls.check_plan(ctx, **typed))


def describe_controller(
    method: str, ctx: ControllerContext, options: dict[str, Any], entry: str | None = None
) -> str | None:
    """The planned noise in words (`Controller.describe_plan`), for `privtune check`."""
    cls = controller_class(method, entry)
    return _naming_the_option(
        cls, method, options, entry, lambda **typed: cls.describe_plan(ctx, **typed)
    )


def _naming_the_option(
    cls: type[Controller],
    method: str,
    options: dict[str, Any],
    entry: str | None,
    call: Callable[..., Any],
) -> Any:
    typed = method_options(method, options, entry or method)
    try:
        return call(**typed.model_dump())
    except (TypeError, ValueError) as err:
        # the controllers' checks begin with the option's name ("weights must be ..."); one
        # naming several ("gamma, explore_decay and reward_scale must be") names none
        message = str(err)
        first = re.match(r"(\w+)( '[^']*')? (must|needs|holds|is) ", message)
        option = first[1] if first and first[1] in type(typed).model_fields else ""
        field = f"methods.{entry or method}" + (f".{option}" if option else "")
        raise ConfigError(field, message, f"correct `{field}` in params.yaml") from None
