"""Named parameter profiles (profiles.yaml): a run of the pipeline with some params changed,
built in a DVC project of its own so it never touches the default pipeline.

A profile is an overlay of params.yaml (the same sections, only what differs; its `methods`,
when given, replaces the list of methods) and may `extends` another profile. A run with a
profile (`make demo-smollm2`, `python -m privtune.profiles run quick`, or the Prefect pipeline's
`profile` / `overrides` parameters) builds in profiles/<name>/ under the checkout: the same
dvc.yaml and code, params.yaml with the overlay, its own outputs, dvc.lock and MLflow store; it
registers its models as `<registry.name>-<name>`, so none of them can become the default
model's champion, and its runs go to the MLflow experiment `<tracking.experiment>-<name>`, so
on a team's server its new runs stay apart from the default pipeline's (a fine-tuning whose
inputs equal a run's anywhere in the store is not trained again: that run is copied into the
profile's experiment). `dvc repro` there
reruns only what changed, like in the checkout. With `--lanes N`, N methods' stages run at
once (privtune/lanes.py: the same outputs and dvc.lock).

    python -m privtune.profiles list              # the profiles, one line each
    python -m privtune.profiles run smollm2 [--cpu-profile smollm2-cpu] [--lanes 3]
    python -m privtune.profiles show quick        # the merged params.yaml, validated
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from privtune import tracking
from privtune.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_UNAVAILABLE
from privtune.config import SOURCE_BUILD, load_params, parse_params
from privtune.errors import ConfigError, PrivtuneError, ServerError

PROFILES_FILE = "profiles.yaml"
PROFILES_DIR = tracking.PROFILES_DIR
REPLACED = ("methods",)  # mappings a profile replaces instead of merging into


def merged(overlay: dict[str, Any], params: dict[str, Any], path: str = "") -> dict[str, Any]:
    """params.yaml overlaid with a profile (a REPLACED mapping is taken whole)."""
    out = dict(params)
    for key, value in overlay.items():
        full = f"{path}{key}"
        if full not in REPLACED and isinstance(value, dict) and isinstance(params.get(key), dict):
            out[key] = merged(value, params[key], f"{full}.")
        else:
            out[key] = value
    return out


def with_dotted(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """params with each dotted key (`finetune.lr`) set; a mapping value replaces the subtree."""
    result = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return result


def known(root: Path) -> dict[str, dict[str, Any]]:
    path = root / PROFILES_FILE
    data = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(PROFILES_FILE, "must map profile names to overlays", "fix its shape")
    return data


def overlay(root: Path, name: str) -> dict[str, Any]:
    """The profile's overlay, with the profiles it extends applied first."""
    profiles = known(root)
    chain: list[str] = []
    while name is not None:
        if name not in profiles:
            raise ConfigError(
                f"{PROFILES_FILE}: {name}",
                "no such profile",
                f"use one of {sorted(profiles) or 'none (add one)'} (`python -m "
                "privtune.profiles list`), or add it to profiles.yaml",
            )
        if name in chain:
            raise ConfigError(f"{PROFILES_FILE}: {name}", "extends itself", "break the cycle")
        chain.append(name)
        name = profiles[name].get("extends")
    result: dict[str, Any] = {}
    for step in reversed(chain):
        body = {k: v for k, v in profiles[step].items() if k != "extends"}
        result = merged(body, result)
    return result


def listing(root: str | Path) -> list[str]:
    """One line a profile: what it extends, the sections it changes and its methods."""
    lines = []
    for name, raw in known(Path(root)).items():
        _, params = resolve(root, name, None)
        changes = ", ".join(key for key in raw if key != "extends") or "nothing"
        parent = f"extends {raw['extends']}; " if raw.get("extends") else ""
        methods = ", ".join(params.get("methods") or {})
        lines.append(f"{name}: {parent}changes {changes}; methods {methods}")
    return lines


def resolve(
    root: str | Path, profile: str | None, overrides: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """(project name, params of the run): params.yaml overlaid with the profile, then the
    dotted ``overrides``. A profile's project is its name (overrides on top change its params,
    and DVC reruns what they change); overrides alone get a name from their content, so
    different sets never share a project."""
    root = Path(root)
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    if profile:
        params = merged(overlay(root, profile), params)
    params = with_dotted(params, overrides or {})
    if profile:
        return profile, params
    digest = hashlib.sha256(json.dumps(overrides or {}, sort_keys=True).encode()).hexdigest()
    return f"overrides-{digest[:8]}", params


def origin(
    profile: str | None,
    overrides: dict[str, Any] | None,
    field: str | None = None,
    root: str | Path | None = None,
) -> str:
    """Where a run's values come from, for an error's fix to name: with ``field`` (and the
    checkout ``root``), where that one came from: the run's overrides, the profile, or the
    checkout's params.yaml (an error said "in profiles.yaml: quick" for a value quick never
    set)."""
    if field is not None and root is not None:
        keys = [
            key
            for key in overrides or {}
            if key == field or key.startswith(f"{field}.") or field.startswith(f"{key}.")
        ]
        if keys:
            return f"the run's overrides ({', '.join(keys)})"
        if profile and _sets(overlay(Path(root), profile), field):
            return f"{PROFILES_FILE}: {profile}"
        return "params.yaml"
    where = f"{PROFILES_FILE}: {profile}" if profile else "params.yaml"
    if overrides:
        where += f" or the run's overrides ({', '.join(overrides)})"
    return where


def _sets(tree: dict[str, Any], dotted: str) -> bool:
    """Whether the nested mapping sets the dotted field (or a section above it whole)."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def run_params(
    root: str | Path, profile: str | None, overrides: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """resolve(), checked against the schema (a bad key fails here, named), its models
    registered as `<registry.name>-<project name>` and its runs tracked in the MLflow
    experiment `<tracking.experiment>-<project name>`, unless the overrides name them."""
    name, params = resolve(root, profile, overrides)
    defaults = parse_params(params, Path(origin(profile, overrides)))
    for dotted, value in (
        ("registry.name", defaults.registry.name),
        ("tracking.experiment", defaults.tracking.experiment),
    ):
        if not any(key.startswith(dotted) for key in overrides or {}):
            section, key = dotted.split(".")
            params.setdefault(section, {})[key] = f"{value}-{name}"
    return name, params


def from_checkout(params: dict[str, Any], root: Path) -> dict[str, Any]:
    """``params`` with the relative paths a user wrote, which mean the checkout ``root``, made
    absolute for profiles/<name>/, where the stages run (rewritten at every run, so a moved
    checkout is followed, and an error names the file the user meant): a corpus
    (prepare.source), a local base model (base.source) and a policy to warm-start from
    (methods.<entry>.warm_start). The generator's module stays as written: the code is copied
    into the profile."""
    from privtune.sources import PACKAGED

    def moved(path: str) -> str:
        if Path(path).is_absolute() or Path(path).parts[:1] == ("src",):
            return path
        return str(root / path)

    params = copy.deepcopy(params)
    prepare, base = params.get("prepare") or {}, params.get("base") or {}
    if isinstance(prepare.get("source"), str):
        prepare["source"] = moved(prepare["source"])
    if isinstance(base.get("source"), str) and base["source"] not in (SOURCE_BUILD, *PACKAGED):
        base["source"] = moved(base["source"])
    for options in (params.get("methods") or {}).values():
        if isinstance(options, dict) and isinstance(options.get("warm_start"), str):
            options["warm_start"] = moved(options["warm_start"])
    return params


def project(
    root: str | Path,
    profile: str | None,
    overrides: dict[str, Any] | None,
    *,
    check: bool = True,
    methods: list[str] | None = None,
) -> Path:
    """profiles/<name>/ under ``root``, created or brought up to date: dvc.yaml and the code
    copied from the checkout (the stages' dependencies), params.yaml of the profile, checked
    against the schema and (``check``) by the preflight, for ``methods`` (default: all), before
    anything runs. What the preflight refuses leaves the project as it was (a new one is
    removed, an existing one keeps its params.yaml): a bad value never stays behind for the
    next `dvc repro` there."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    name, params = run_params(root, profile, overrides)
    target = root / PROFILES_DIR / name
    created = not target.exists()
    params_file, origin_file = target / "params.yaml", target / tracking.BUILT_FROM
    previous = {f: f.read_text() if f.is_file() else None for f in (params_file, origin_file)}
    try:
        target.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(from_checkout(params, root), sort_keys=False)
        # what it was made of, and the digest that tells a hand edit since (git_modified)
        built = {"profile": profile, "overrides": overrides or {}}
        built["params_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        texts = {params_file: text, origin_file: json.dumps(built)}
        for path, text in texts.items():
            if previous[path] != text:
                path.write_text(text)
        load_params(params_file)
        shutil.copy2(root / "dvc.yaml", target / "dvc.yaml")
        shutil.rmtree(target / "src", ignore_errors=True)
        shutil.copytree(
            root / "src", target / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        if check:
            from privtune.stages.preflight import check_project

            try:
                check_project(target, methods)  # before DVC removes any stage's outputs
            except ConfigError as err:  # say where the value came from
                entry = err.field.removeprefix("methods.").split(".")[0]
                named = entry in (methods or []) and entry not in (params.get("methods") or {})
                if err.field.startswith("methods.") and named:
                    where = "the run's `methods`"  # a method named there, not in params.yaml
                else:
                    where = origin(profile, overrides, err.field, root)
                raise ConfigError(err.field, err.problem, f"{err.fix} (in {where})") from None
        if not (target / ".dvc").is_dir():  # its own DVC project; the checkout's DVC skips it
            Repo.init(str(target), no_scm=True).close()
            with Repo(str(target)) as repo, repo.config.edit() as config:
                config["core"]["analytics"] = False
                config["core"]["check_update"] = False
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for path, text in previous.items():
                if text is None:
                    path.unlink(missing_ok=True)
                elif not path.is_file() or path.read_text() != text:
                    path.write_text(text)
        raise
    return target


def repro(target: Path, *stages: str) -> int:
    """`dvc repro [stages]` in a profile's project, with its own copy of the code importable;
    returns DVC's exit code."""
    from privtune.lanes import dvc_env

    dvc, env = dvc_env(target)
    return subprocess.run([dvc, "repro", *stages], cwd=target, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m privtune.profiles",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["run", "show", "list"])
    parser.add_argument("profile", nargs="?", help="a profile of profiles.yaml (not for list)")
    parser.add_argument("--cpu-profile", help="the profile to run instead without CUDA")
    parser.add_argument(
        "--lanes",
        type=int,
        default=1,
        help="methods whose stages run at once (1: one stage after another, as `dvc repro`); "
        "a profile replaced by --cpu-profile runs one after another",
    )
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    if args.lanes < 1:
        parser.error("--lanes must be at least 1")
    if (args.action == "list") != (args.profile is None):
        parser.error("list takes no profile; run and show take one")
    if args.action == "list":
        try:
            print("\n".join(listing(args.root)))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    name, lanes = args.profile, args.lanes
    if args.cpu_profile:
        import torch

        if not torch.cuda.is_available():
            name, lanes = args.cpu_profile, 1
    try:
        if args.action == "show":
            run, params = resolve(args.root, name, None)
            parse_params(params, Path(f"{PROFILES_FILE}: {name}"))
            print(yaml.safe_dump(params, sort_keys=False))
            return 0
        target = project(args.root, name, None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ServerError as err:
        print(f"unavailable: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PrivtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"profile {name}: building in {target}", file=sys.stderr)
    try:
        if lanes == 1:
            return repro(target)
        from privtune.lanes import run

        return run(target, lanes)
    except ServerError as err:  # the MLflow server the lanes' experiment is made on
        print(f"unavailable: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except PrivtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            "interrupted: rerun the same command to go on (what is done is not redone)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
