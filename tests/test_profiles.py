"""Profiles (profiles.yaml): overlays of params.yaml, extended by name, checked against the
schema; the SmolLM2 profiles are valid and pass the registry's delta gate."""

from pathlib import Path

import pytest
import yaml

from privtune.config import parse_params
from privtune.errors import ConfigError
from privtune.profiles import merged, overlay, resolve, with_dotted

ROOT = Path(__file__).resolve().parents[1]


def test_an_overlay_merges_sections_and_replaces_the_method_list():
    params = {
        "base": {"source": "build", "max_length": 384},
        "finetune": {"lora": {"r": 8}},
        "methods": {"nonprivate": {}, "dpsgd": {"clip": 1.0, "extra": 2}, "lmo": {"clip": 1.0}},
    }
    profile = {
        "base": {"source": "smollm2-135m", "max_length": "auto"},
        "finetune": {"delta": 1e-5, "lora": {"target_modules": ["q_proj", "v_proj"]}},
        "methods": {"nonprivate": {}, "dpsgd": {"clip": 0.5}},
    }
    target = merged(profile, params)
    assert target["methods"] == profile["methods"]  # replaced, not merged
    assert target["finetune"]["lora"] == {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert target["base"] == {"source": "smollm2-135m", "max_length": "auto"}
    assert with_dotted(target, {"finetune.lora.r": 4})["finetune"]["lora"]["r"] == 4
    assert params["finetune"]["lora"] == {"r": 8}  # the inputs are not modified


@pytest.mark.parametrize("name", ["smollm2", "smollm2-cpu", "smollm2-cpu-methods", "quick"])
def test_shipped_profiles_are_valid_and_pass_the_delta_gate(name):
    run, params = resolve(ROOT, name, None)
    checked = parse_params(params)
    assert run == name
    if name.startswith("smollm2"):
        assert checked.base.source == "smollm2-135m"
        assert checked.finetune.delta <= checked.registry.gates.max_delta
    expected = {
        "smollm2": set(yaml.safe_load((ROOT / "params.yaml").read_text())["methods"]),
        "smollm2-cpu": {"nonprivate", "dpsgd", "rldp"},
        "smollm2-cpu-methods": set(yaml.safe_load((ROOT / "params.yaml").read_text())["methods"]),
        "quick": {"nonprivate", "dpsgd"},
    }[name]
    assert set(checked.methods) == expected


def test_the_quick_profile_trains_on_every_canary_it_plants():
    """quick's notes are cut at 96 tokens of its small tokenizer (about 175 characters): its
    canaries are planted within prepare.canaries.max_offset of a note's start, so the attack
    stage measures exposure on every planted copy (at 600 it was 13 of 42)."""
    from privtune.data.canaries import trained_occurrences
    from privtune.data.tokenization import train_tokenizer
    from privtune.stages.prepare import build

    params = parse_params(resolve(ROOT, "quick", None)[1])
    prepared = build(params, ROOT)  # in memory: nothing is written
    public = [r["text"] for r in prepared.splits["public"]]
    tokenizer = train_tokenizer(public, params.base.vocab_size)
    train = [r["text"] for r in prepared.splits["train"]]
    seen = trained_occurrences(prepared.canaries, train, tokenizer, params.base.max_length)
    assert sum(seen.values()) == sum(c.repetitions for c in prepared.canaries) == 42


def test_extends_applies_the_base_profile_first(tmp_path):
    (tmp_path / "profiles.yaml").write_text(
        yaml.safe_dump(
            {
                "big": {"finetune": {"lr": 0.5, "epochs": 2.0}},
                "small": {"extends": "big", "finetune": {"epochs": 0.5}},
                "loop": {"extends": "loop"},
            }
        )
    )
    assert overlay(tmp_path, "small") == {"finetune": {"lr": 0.5, "epochs": 0.5}}
    with pytest.raises(ConfigError, match="extends itself"):
        overlay(tmp_path, "loop")
    with pytest.raises(ConfigError, match="no such profile.*big"):
        overlay(tmp_path, "huge")


def test_list_says_each_profile_in_a_line(capsys):
    from privtune.profiles import main

    assert main(["list", "--root", str(ROOT)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) == set(yaml.safe_load((ROOT / "profiles.yaml").read_text()))
    assert lines["smollm2-cpu"].startswith("extends smollm2; changes ")
    assert lines["smollm2-cpu"].endswith("methods nonprivate, dpsgd, rldp")
    with pytest.raises(SystemExit):
        main(["list", "quick"])  # list takes no profile
    assert main(["show", "nosuch", "--root", str(ROOT)]) == 2
    assert "`python -m privtune.profiles list`" in capsys.readouterr().err


def test_relative_paths_in_a_profile_run_mean_the_checkout(tmp_path):
    """A corpus, a local base model or a policy named relative to the checkout (in
    params.yaml, profiles.yaml or a run's overrides) is found from profiles/<name>/, where
    the stages run (walkthrough finding: `prepare.source: corpus/notes.jsonl` was looked for
    under profiles/<name>/corpus/): written as the checkout's absolute path, so an error names
    the file the user meant; the generator's module is copied there and stays."""
    import shutil

    from privtune.config import load_params
    from privtune.profiles import project

    for name in ("params.yaml", "dvc.yaml", "profiles.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / "src" / "privtune").mkdir(parents=True)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.jsonl").write_text('{"text": "a note"}\n')
    overrides = {
        "prepare.source": "corpus/notes.jsonl",
        "base.source": "models/mine",
        "methods.rldp.warm_start": "policies/rldp.pt",
    }
    target = project(tmp_path, None, overrides, check=False)  # the layout, not the data
    params = load_params(target / "params.yaml")
    assert params.prepare.source == str(tmp_path.resolve() / "corpus" / "notes.jsonl")
    assert (target / params.prepare.source).resolve() == tmp_path / "corpus" / "notes.jsonl"
    assert (target / params.base.source).resolve() == tmp_path / "models" / "mine"
    warm_start = params.methods["rldp"].warm_start
    assert (target / warm_start).resolve() == tmp_path / "policies" / "rldp.pt"

    defaults = load_params(project(tmp_path, "quick", None, check=False) / "params.yaml")
    assert defaults.prepare.source == "src/privtune/data/generator.py"  # copied with the code
    assert defaults.base.source == "build"
    absolute = {"prepare.source": str(tmp_path / "corpus" / "notes.jsonl")}
    moved = load_params(project(tmp_path, None, absolute, check=False) / "params.yaml")
    assert moved.prepare.source == absolute["prepare.source"]


def test_a_bad_override_is_named_where_it_came_from():
    """The fix said `correct finetune.epsilon in profiles.yaml: quick` for a value the run's
    overrides set (walkthrough finding)."""
    from privtune.profiles import run_params

    for profile, where in (("quick", "profiles.yaml: quick"), (None, "params.yaml")):
        with pytest.raises(ConfigError) as bad:
            run_params(ROOT, profile, {"finetune.epsilon": 0})
        assert f"in {where} or the run's overrides (finetune.epsilon)" in str(bad.value)


def test_a_refused_profile_run_names_where_the_refused_value_came_from(tmp_path):
    """Every refusal of a profile's check ended "(in profiles.yaml: quick)", also for a value
    from the checkout's params.yaml, the run's overrides, or a method the run's `methods`
    named (a walk-through's findings): it names the one the value came from."""
    import shutil

    import yaml

    from privtune.profiles import project

    for name in ("params.yaml", "dvc.yaml", "profiles.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))

    def refusal(*args, **kwargs) -> str:
        with pytest.raises(ConfigError) as err:
            project(tmp_path, *args, **kwargs)
        return err.value.fix

    tiny = {"finetune.epsilon": 1e-4}  # out of any noise's reach: refused by the check
    assert refusal("quick", tiny).endswith("(in the run's overrides (finetune.epsilon))")
    assert refusal("quick", None, methods=["dpsgdd"]).endswith("(in the run's `methods`)")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["finetune"]["epsilon"] = 1e-4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert refusal("quick", None).endswith("(in params.yaml)")
