"""A run with a profile or parameter overrides (e.g. a quick, reduced run from a deployment).

It builds in a DVC project of its own, profiles/<name>/ under the checkout (the same dvc.yaml
and code, params.yaml with the overrides), so it never changes the default pipeline's
params.yaml, outputs or dvc.lock, and it registers its models as `<registry.name>-<name>`, so
none of them can become the default model's champion. profiles.yaml names the profiles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

PROFILES_FILE = "profiles.yaml"
PROFILES_DIR = Path("profiles")


def resolve(
    root: str | Path, profile: str | None, overrides: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """(name, dotted overrides): the profile's from profiles.yaml, then ``overrides`` on top.
    Overrides alone get a name from their content, so different sets never share a project."""
    from privtune.errors import ConfigError

    merged: dict[str, Any] = {}
    if profile:
        path = Path(root) / PROFILES_FILE
        known = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
        if profile not in known:
            raise ConfigError(
                f"{PROFILES_FILE}: {profile}",
                "no such profile",
                f"use one of {sorted(known) or 'none (add one)'} or pass `overrides`",
            )
        merged |= known[profile]
    merged |= overrides or {}
    if profile:
        return profile, merged
    digest = hashlib.sha256(json.dumps(merged, sort_keys=True).encode()).hexdigest()[:8]
    return f"overrides-{digest}", merged


def apply(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's mapping with each dotted key set (a mapping value replaces the subtree)."""
    result = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return result


def project(root: str | Path, profile: str | None, overrides: dict[str, Any] | None) -> Path:
    """profiles/<name>/ under ``root``, created or brought up to date: dvc.yaml and the code
    copied from the checkout (the stages' dependencies), params.yaml with the overrides."""
    from dvc.repo import Repo

    from privtune.config import load_params

    root = Path(root).resolve()
    name, changes = resolve(root, profile, overrides)
    target = root / PROFILES_DIR / name
    params = apply(yaml.safe_load((root / "params.yaml").read_text()) or {}, changes)
    if "registry.name" not in changes:
        registry = params.setdefault("registry", {})
        registry["name"] = f"{registry.get('name', 'privtune-clinical-notes')}-{name}"
    target.mkdir(parents=True, exist_ok=True)
    params_file = target / "params.yaml"
    text = yaml.safe_dump(params, sort_keys=False)
    if not params_file.is_file() or params_file.read_text() != text:
        params_file.write_text(text)
    load_params(params_file)  # an unknown or invalid key fails here, named, before any stage
    shutil.copy2(root / "dvc.yaml", target / "dvc.yaml")
    shutil.rmtree(target / "src", ignore_errors=True)
    shutil.copytree(
        root / "src", target / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    if not (target / ".dvc").is_dir():  # its own DVC project; the checkout's DVC skips it
        Repo.init(str(target), no_scm=True).close()
        with Repo(str(target)) as repo, repo.config.edit() as config:
            config["core"]["analytics"] = False
            config["core"]["check_update"] = False
    return target
