"""Parameter profiles: a YAML overlay of params.yaml, run as one DVC experiment.

A profile (e.g. `params-smollm2.yaml`) holds only what differs from params.yaml; its `methods`,
when given, replaces the list of methods. It becomes `dvc exp run -S ...` overrides (DVC's
Hydra grammar: `key=value` to change, `+key=value` to add, `~key` to remove), so the run is an
ordinary DVC experiment: `dvc exp show` lists it, params.yaml in the workspace shows what ran.

    python -m privtune.profiles run params-smollm2.yaml [--cpu params-smollm2-cpu.yaml]
    python -m privtune.profiles show params-smollm2.yaml     # print the dvc command only
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from privtune.config import parse_params
from privtune.errors import ConfigError

REPLACED = ("methods",)  # mappings a profile replaces instead of merging into
_PLAIN = re.compile(r"^[A-Za-z0-9_./@-]+$")


def _value(value: Any) -> str:
    """A value in the override grammar (no spaces, so the command splits cleanly)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        # 1.0e-05, not 1e-05: YAML 1.1 readers (PyYAML) take a mantissa without a dot for a string
        mantissa, _, exponent = repr(value).partition("e")
        if exponent and "." not in mantissa:
            mantissa += ".0"
        return mantissa + (f"e{exponent}" if exponent else "")
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if not _PLAIN.match(text) or text in ("true", "false", "null"):
        raise ConfigError("profile", f"value {text!r} needs quoting", "use a plain word or path")
    return text


def merged(profile: dict[str, Any], params: dict[str, Any], path: str = "") -> dict[str, Any]:
    """params.yaml overlaid with a profile (a REPLACED mapping is taken whole)."""
    out = dict(params)
    for key, value in profile.items():
        full = f"{path}{key}"
        if full not in REPLACED and isinstance(value, dict) and isinstance(params.get(key), dict):
            out[key] = merged(value, params[key], f"{full}.")
        else:
            out[key] = value
    return out


def overrides(
    target: dict[str, Any], params: dict[str, Any], path: str = "", exact: bool = False
) -> list[str]:
    """`-S` arguments that turn ``params`` into ``target``; inside a REPLACED mapping
    (``exact``) keys that ``target`` lacks are removed."""
    args = [f"~{path}{old}" for old in params if old not in target] if exact else []
    for key, value in target.items():
        full = f"{path}{key}"
        if key not in params:
            args.append(f"+{full}={_value(value)}")
        elif isinstance(value, dict) and isinstance(params[key], dict):
            args += overrides(value, params[key], f"{full}.", exact or full in REPLACED)
        elif value != params[key]:
            args.append(f"{full}={_value(value)}")
    return args


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "profile not found", "run from the project root")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a profile is a mapping of params.yaml sections", "fix it")
    return data


def command(profiles: list[Path], params_file: Path, name: str) -> list[str]:
    """The `dvc exp run` command of the profiles (later ones overlay earlier ones), checked
    against the parameter schema first, so a bad profile fails before anything runs."""
    params = yaml.safe_load(params_file.read_text()) or {}
    target = params
    for profile in profiles:
        target = merged(_read(profile), target)
    parse_params(target, profiles[-1])
    args = overrides(target, params)
    return ["dvc", "exp", "run", "-n", name, *(a for arg in args for a in ("-S", arg))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privtune.profiles", description=__doc__)
    parser.add_argument("action", choices=["run", "show"])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--cpu", type=Path, help="overlay used when no CUDA device is present")
    parser.add_argument("--name", help="experiment name (default: profile name and time)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    profiles = [args.profile]
    if args.cpu is not None:
        import torch

        if not torch.cuda.is_available():
            profiles.append(args.cpu)
    # DVC refuses a second experiment of the same name (and -f would rerun every stage)
    name = args.name or f"{profiles[-1].stem.removeprefix('params-')}-{time.strftime('%m%d-%H%M')}"
    cmd = command(profiles, args.params, name)
    print(f"profile {' + '.join(map(str, profiles))}:\n{shlex.join(cmd)}", file=sys.stderr)
    if args.action == "show":
        return 0
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
