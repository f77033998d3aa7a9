"""params.yaml validation: impossible values give errors naming the field and the fix."""

import re
from pathlib import Path

import pytest
import yaml

from privtune.config import load_params, parse_params
from privtune.control.base import ControllerContext
from privtune.control.registry import build_controller
from privtune.errors import ConfigError
from privtune.privacy.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert {"nonprivate", "dpsgd"} <= set(params.methods)
    assert params.method("dpsgd") == ("dpsgd", {"clip": 1.0})


@pytest.mark.parametrize("epsilon", [0, -1.0, float("inf"), float("nan")])
def test_impossible_epsilon(epsilon):
    with pytest.raises(ConfigError, match=r"finetune\.epsilon") as err:
        parse_params({"finetune": {"epsilon": epsilon}})
    assert "Fix:" in str(err.value)


@pytest.mark.parametrize("delta", [0, 1.0, -1e-5])
def test_delta_outside_unit_interval(delta):
    with pytest.raises(ConfigError, match=r"finetune\.delta"):
        parse_params({"finetune": {"delta": delta}})


def test_delta_must_be_below_one_over_n():
    params = parse_params({"finetune": {"delta": 0.01}})
    with pytest.raises(ConfigError, match=r"finetune\.delta.*below 1/N"):
        make_plan(1000, params.finetune, private=True)
    assert make_plan(1000, parse_params({}).finetune, private=False).delta == pytest.approx(1e-4)


def test_canary_counts_that_cannot_be_planted_are_refused_when_params_load():
    with pytest.raises(ConfigError, match=r"prepare\.canaries\.repetitions.*repeats a count"):
        parse_params({"prepare": {"canaries": {"repetitions": [4, 4]}}})
    # 10,000 identifiers for 10,009 canaries: drawing a new one would never end
    small = {"identifier": "ID-####", "audit": 10_000}
    with pytest.raises(ConfigError, match=r"prepare\.canaries.*10,000 distinct values"):
        parse_params({"prepare": {"canaries": small}})
    assert parse_params({"prepare": {"canaries": {"identifier": "ID-####"}}})  # 137 of 10,000


def test_unknown_key_is_rejected_with_its_dotted_name():
    with pytest.raises(ConfigError, match=r"finetune\.lora\.rank.*unknown parameter"):
        parse_params({"finetune": {"lora": {"rank": 4}}})


def test_unknown_method_and_bad_options_are_refused_when_params_load():
    """Every method's options are typed: refused at load time, before any stage writes, with
    the dotted option, the value and the allowed range."""
    with pytest.raises(ConfigError, match=r"methods\.fancy.*unknown method 'fancy'.*dpsgd"):
        parse_params({"methods": {"fancy": {}}})
    with pytest.raises(ConfigError, match=r"methods\.dpsgd\.clipp.*unknown.*options: method, clip"):
        parse_params({"methods": {"dpsgd": {"clipp": 1.0}}})
    with pytest.raises(ConfigError, match=r"methods\.rldp\.rl_interval.*greater than or equal"):
        parse_params({"methods": {"rldp": {"rl_interval": 0}}})
    with pytest.raises(ConfigError, match=r"methods\.fast\.clip.*greater than 0.*got -1"):
        parse_params({"methods": {"fast": {"method": "dpsgd", "clip": -1}}})
    with pytest.raises(ConfigError, match=r"methods\.dpsgd\.clip.*finite number"):
        parse_params({"methods": {"dpsgd": {"clip": float("inf")}}})  # no clipping at all
    with pytest.raises(ConfigError, match=r"methods\.decay\.schedule"):
        parse_params({"methods": {"decay": {"schedule": "cosine"}}})
    with pytest.raises(ConfigError, match=r"methods\.missing"):
        parse_params({}).method("missing")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"fast": {"methdo": "dpsgd"}}, "methods.fast.methdo: unknown parameter. Fix: did you "
         "mean `methods.fast.method`? It names the method: one of auto_s, decay, dpsgd"),
        ({"fast": {"method": "dpsg"}}, "methods.fast.method: unknown method 'dpsg'. Fix: did "
         "you mean `dpsgd`? set it to a method; one of: auto_s"),
        ({"dpsdg": {}}, "methods.dpsdg: unknown method 'dpsdg'. Fix: did you mean `dpsgd`? "
         "name the entry after a method or set its `method:`"),
        ({"dpsgd": {"methdo": "rldp"}}, "did you mean `methods.dpsgd.method`?"),
    ],
)  # fmt: skip
def test_a_misspelt_method_or_method_key_is_named_with_the_likely_fix(entry, says):
    """An entry takes its method from its name or its `method:` key: a typo in either is
    named as what it is (not as an unknown method 'fast'), with the closest spelling."""
    with pytest.raises(ConfigError) as refused:
        parse_params({"methods": entry})
    assert says in str(refused.value)


def test_build_controller_names_the_entry_of_a_bad_option():
    ctx = ControllerContext(("all",), 0.1, 10, 1.0, 1e-5, 1.0)
    with pytest.raises(ConfigError, match=r"methods\.mine\.clipp"):
        build_controller("dpsgd", ctx, {"clipp": 1.0}, "mine")
    with pytest.raises(ConfigError, match=r"methods\.nosuch.*unknown method"):
        build_controller("nosuch", ctx, {}, "nosuch")


def test_a_controllers_own_check_names_the_option_it_failed(monkeypatch):
    """Options typed alone can still disagree with the run (one weight per adapter): the
    controller's check names the dotted option, not just the entry."""
    ctx = ControllerContext(("q", "v"), 0.1, 10, 1.0, 1e-5, 1.0)
    with pytest.raises(ConfigError, match=r"methods\.mine\.weights: weights must be 2") as err:
        build_controller("per_adapter", ctx, {"weights": [1.0, 2.0, 3.0]}, "mine")
    assert "correct `methods.mine.weights` in params.yaml" in str(err.value)
    with pytest.raises(ConfigError, match=r"methods\.law\.params: params needs exactly"):
        build_controller("lmo", ctx, {"params": {"a1": 1.0}}, "law")
    # a check over several options names none of them (and a prefix is not a name)
    from privtune.control.registry import CONTROLLERS

    class Picky(CONTROLLERS["quantile"]):
        def __init__(self, ctx, **options):
            raise ValueError("clip_lr, clip and target_quantile must agree")

    class Lr(CONTROLLERS["quantile"]):
        def __init__(self, ctx, **options):
            raise ValueError("clip_lr must be > 0")

    for cls, field in [(Picky, "methods.q: "), (Lr, "methods.q.clip_lr: ")]:
        monkeypatch.setitem(CONTROLLERS, "quantile", cls)
        with pytest.raises(ConfigError, match=re.escape(field)):
            build_controller("quantile", ctx, {}, "q")


def test_a_validators_message_comes_without_pydantics_prefix():
    with pytest.raises(ConfigError) as err:
        parse_params({"prepare": {"canaries": {"identifier": "MRN 12"}}})
    assert "Value error" not in str(err.value) and "random characters" in str(err.value)


def test_params_file_and_code_defaults_are_one_set():
    """A section left out of params.yaml means what the shipped file says (no second set)."""
    shipped = load_params(ROOT / "params.yaml").model_dump()
    assert shipped == parse_params({}).model_dump()
    for section in ("prepare", "base", "finetune", "evaluate", "attack", "registry", "runner"):
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        del raw[section]
        assert parse_params(raw).model_dump() == shipped


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("finetune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump({"finetune": {"epsilon": "eight"}}))
    with pytest.raises(ConfigError, match=r"finetune\.epsilon"):
        load_params(bad)


@pytest.mark.parametrize("name", ["notes.csv", "notes.jsonl", "notes.JSON", "notes.txt"])
def test_a_corpus_passed_as_the_parameter_file_is_refused_by_its_suffix(tmp_path, name):
    """`--params notes.csv` (the corpus for the parameter file): a .json object keyed by MRN
    is valid YAML, and its keys would be named as unknown parameters."""
    notes = tmp_path / name
    notes.write_text('{"MRN4411": "Seen in clinic", "MRN4412": "Admitted"}\n')
    with pytest.raises(ConfigError, match="is a corpus, not a parameter file") as err:
        load_params(notes)
    assert "MRN" not in str(err.value) and "prepare.source" in str(err.value)


@pytest.mark.parametrize(
    "content",
    [
        "note_id,patient,body\nn1,P0010,Seen in clinic: Assessment: depression, MRN 4411.\n",
        '{"rid": "n00001", "pt": "P0010", "note": "Seen in clinic, MRN 4411."}\n'
        '{"rid": "n00002", "pt": "P0011", "note": "Admitted: MRN 4412."}\n',
        "Seen: !Smith pain\n",  # PyYAML quotes the tag
        "Seen: *Jones\n",  # and the alias
        'Seen: "Jones \\q"\n',  # and the escape
        "Seen: Jones \x07 pain\n",  # a character YAML may not hold (a ReaderError)
    ],
)
def test_a_yaml_error_names_the_problem_and_position_without_quoting_the_file(tmp_path, content):
    """PyYAML's error carries a snippet of the file and quotes tokens from it: of a corpus
    saved under a parameter file's name, a patient's note. Kept: its problem and position."""
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(
        ConfigError, match=r"not valid YAML \(.*(line \d+, column|character) \d+\)"
    ) as err:
        load_params(path)
    message = str(err.value)
    for word in ("MRN", "P0010", "n00001", "Smith", "Jones", "clinic", "'q'"):
        assert word not in message
    assert "not the corpus" in message


def test_a_directory_or_binary_file_as_the_parameter_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a parameter file"):
        load_params(tmp_path)
    latin = tmp_path / "params.yaml"
    latin.write_bytes("note\nPatient Ren\xe9e, MRN 4411\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte offset 16\)") as err:
        load_params(latin)
    assert "Ren" not in str(err.value)


@pytest.mark.parametrize("field", ["finetune", "base"])
def test_a_device_name_torch_does_not_know_is_refused_when_params_load(tmp_path, field):
    """`privtune check` (and a stage's preflight) loads params: `device: gpu` is refused there,
    not after prepare and base ran. Whether this machine has CUDA is the stage's check: a GPU
    worker's params are often checked on a CPU machine."""
    path = tmp_path / "params.yaml"
    for bad in ("gpu", "Cuda", "cuda:", "cuda:x"):
        path.write_text(yaml.safe_dump({field: {"device": bad}}))
        with pytest.raises(ConfigError, match=rf"{field}\.device: must be auto .*cuda:N"):
            load_params(path)
    for good in ("auto", "cpu", "cuda", "cuda:3"):
        path.write_text(yaml.safe_dump({field: {"device": good}}))
        assert getattr(load_params(path), field).device == good
