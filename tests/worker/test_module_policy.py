"""What code a job may run (`dptrain.worker.module_policy`): the rule as a table of references,
the spec's fields it covers, and a rank's own check before it imports anything."""

from __future__ import annotations

import pytest

from dptrain.worker.environment import ALLOWED_MODULES
from dptrain.worker.module_policy import (
    check_job_code,
    check_prefix,
    reference_rule,
    shipped_modules,
    spec_code_errors,
    zoo_references,
)
from dptrain.worker.spec import JobSpec, JobSpecError

SHIPPED = shipped_modules(["mymodels.py", "mypkg/__init__.py", "mypkg/nets.py", "README.md"])
ALLOWED = ("mylab", "org.team.models")

# (reference, may run): every kind the rule knows, and the near misses.
TABLE = [
    ("os:system", False),
    ("os.path:join", False),
    ("subprocess:run", False),
    ("builtins:eval", False),
    ("importlib:import_module", False),
    ("pickle:loads", False),
    ("dptrain.coordinator.server.server:serve", False),
    ("dptrain.worker.job_code:resolve_loss", False),
    ("dptrain.engine.models:get_model", False),        # the zoo's machinery imports anything
    ("dptrain.engine.models.registry:import_reference", False),
    ("dptrain.engine.models.mlp:np.load", False),      # an attribute walk out of the zoo
    ("dptrain.engine.models:LeNet", True),             # the zoo
    ("dptrain.engine.models.mlp:mlp", True),
    ("dptrain.engine.models.resnet:ResNet", True),
    ("mymodels:small_cnn", True),                      # shipped code
    ("mypkg.nets:build", True),
    ("mymodelsx:build", False),
    ("mylab:build", True),                             # an allowed prefix, whole components
    ("mylab.models.cnn:build", True),
    ("mylabx:build", False),                           # a near miss of a prefix
    ("mylab_extra.models:build", False),
    ("org.team.models.v2:build", True),
    ("org.team:build", False),                         # above the prefix
    ("org.teamx.models:build", False),
]


@pytest.mark.parametrize("reference, runs", TABLE)
def test_the_rule_allows_shipped_code_the_zoo_and_allowed_prefixes_only(reference, runs):
    rule = reference_rule(reference, SHIPPED, ALLOWED, zoo_references())
    assert (rule is None) is runs, rule
    if not runs:
        assert rule == (
            "must name the job's shipped code (mymodels, mypkg), a model of the zoo, or a module "
            "under a prefix this coordinator allows (mylab, org.team.models); an admin allows "
            "installed modules with `dptrain serve --allow-module PREFIX`")


def test_nothing_is_allowed_by_default():
    for reference in ("os:system", "mylab:build", "numpy:load"):
        assert "allows (none)" in reference_rule(reference, frozenset(), (), zoo_references())


def test_shipped_code_cannot_claim_the_standard_library_or_dptrain():
    # An os.py in the archive would not be what `import os` finds on a rank (it is loaded).
    files = ["os.py", "subprocess/__init__.py", "dptrain/x.py", "builtins.py", "own.py",
             "pkg/sub/deep.py", "data/train.csv", "not-a-name.py", ".hidden.py", "__main__.py"]
    # data/ counts: any directory imports, as a namespace package.
    assert shipped_modules(files) == {"own", "pkg", "data"}
    assert reference_rule("os:system", shipped_modules(files), (), zoo_references()) is not None


def test_the_zoo_is_its_registered_constructors():
    # Listed by hand from engine/models/: each model's module and name, and the package's
    # exports of the same constructors.
    assert zoo_references() == {
        "dptrain.engine.models.mlp:mlp", "dptrain.engine.models.lenet:LeNet",
        "dptrain.engine.models.resnet:ResNet", "dptrain.engine.models.transformer_lm:TransformerLM",
        "dptrain.engine.models.lstm_lm:LSTMLanguageModel", "dptrain.engine.models:LeNet",
        "dptrain.engine.models:ResNet", "dptrain.engine.models:TransformerLM",
        "dptrain.engine.models:LSTMLanguageModel"}


def test_a_model_registered_by_other_code_is_not_the_zoo(monkeypatch):
    from dptrain.engine import nn
    from dptrain.engine.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after

    @registry.register_model("outside_the_zoo_example")
    def outside(width: int = 2) -> nn.Module:
        return nn.Linear(2, width)

    zoo_references.cache_clear()
    try:
        assert "outside_the_zoo_example" in registry.list_models()
        assert not any("outside" in ref for ref in zoo_references())
    finally:
        zoo_references.cache_clear()


@pytest.mark.parametrize("prefix", ["", "mylab.", ".mylab", "my-lab", "mylab:f", "a..b", "1lab"])
def test_a_bad_prefix_is_refused_naming_the_option(prefix):
    with pytest.raises(ValueError) as info:
        check_prefix(prefix)
    assert str(info.value) == ("--allow-module: must be a module prefix of dotted Python "
                               f"identifiers (e.g. mylab.models), got {prefix!r}")


DECLARATIVE = {"name": "j", "model": {"name": "mlp", "args": {"in_features": 4}},
               "dataset": {"name": "digits"}, "optimizer": {"name": "sgd", "lr": 0.1},
               "batch_size": 8, "max_steps": 1}


def test_every_reference_field_is_checked_and_named():
    spec = JobSpec.from_dict({**DECLARATIVE, "model": {"name": "os:system"},
                              "dataset": {"name": "subprocess:run"}, "loss": "builtins:eval"})
    errors = spec_code_errors(spec, None, ())
    assert [(e.path, e.value) for e in errors] == [
        ("model.name", "os:system"), ("dataset.name", "subprocess:run"),
        ("loss", "builtins:eval")]
    assert str(errors[0]).startswith("model.name: must name the job's shipped code (none)")
    assert str(errors[0]).endswith(", got 'os:system'")
    assert spec_code_errors(JobSpec.from_dict(DECLARATIVE), None, ()) == []  # zoo names


@pytest.mark.parametrize("entrypoint, files, refused", [
    ("train.py --lr 0.1", ["train.py", "lib/x.py"], False),
    ("./train.py", ["train.py"], False),
    ("lib/run.py", ["lib/run.py"], False),
    ("train.py", ["./train.py"], False),       # an archive made by tar czf code.tgz .
    ("train.py", None, True),                  # no shipped code at all
    ("other.py", ["train.py"], True),
    ("../train.py", ["train.py"], True),
    ("lib/../../train.py", ["train.py"], True),
])
def test_an_entrypoint_must_be_a_script_of_the_shipped_code(entrypoint, files, refused):
    spec = JobSpec.from_dict({"name": "own", "entrypoint": entrypoint})
    errors = spec_code_errors(spec, files, ())
    assert [str(e) for e in errors] == ([
        "entrypoint: must name a script of the job's shipped code (code: DIR ships the "
        f"directory), got {entrypoint!r}"] if refused else [])


# ---------------------------------------------------------------- a rank's own check

def test_without_a_coordinator_a_rank_runs_anything(tmp_path):
    spec = JobSpec.from_dict({**DECLARATIVE, "model": {"name": "os:system"}})
    check_job_code(spec, str(tmp_path), environ={})  # dptrain run: the user's own machine


def test_a_rank_applies_the_prefixes_its_launch_gives(tmp_path):
    spec = JobSpec.from_dict({**DECLARATIVE, "model": {"name": "mylab.nets:build"}})
    check_job_code(spec, str(tmp_path), environ={ALLOWED_MODULES: "other,mylab"})
    with pytest.raises(JobSpecError) as info:  # the coordinator's list shrank since submission
        check_job_code(spec, str(tmp_path), environ={ALLOWED_MODULES: ""})
    assert str(info.value).startswith("model.name: must name the job's shipped code (none), a "
                                      "model of the zoo, or a module under a prefix this "
                                      "coordinator allows (none)")
    with pytest.raises(JobSpecError, match=f"^{ALLOWED_MODULES}: must be comma-separated"):
        check_job_code(spec, str(tmp_path), environ={ALLOWED_MODULES: "my lab"})


def test_a_shipped_reference_must_resolve_inside_the_code(tmp_path, monkeypatch):
    code = tmp_path / "code"
    (code / "mypkg").mkdir(parents=True)
    (code / "mypkg" / "__init__.py").write_text("")
    (code / "mine.py").write_text("")
    (code / "train.py").write_text("")
    monkeypatch.syspath_prepend(str(code))
    spec = JobSpec.from_dict({**DECLARATIVE, "code": "sha256:" + "a" * 64,
                              "model": {"name": "mypkg:build"}, "loss": "mine:loss"})
    check_job_code(spec, str(code), environ={ALLOWED_MODULES: ""})
    # `yaml` is loaded from site-packages on every rank: a yaml/ in the code is not what runs.
    (code / "yaml").mkdir()
    (code / "yaml" / "__init__.py").write_text("")
    shadowed = JobSpec.from_dict({**DECLARATIVE, "code": "sha256:" + "a" * 64,
                                  "model": {"name": "yaml:load"}})
    with pytest.raises(JobSpecError) as info:
        check_job_code(shadowed, str(code), environ={ALLOWED_MODULES: ""})
    assert str(info.value).startswith(f"model.name: must resolve inside the job's code ({code}),"
                                      " but 'yaml' is found at ")
    own = JobSpec.from_dict({"name": "own", "entrypoint": "train.py",
                             "code": "sha256:" + "a" * 64})
    check_job_code(own, str(code), environ={ALLOWED_MODULES: ""})
