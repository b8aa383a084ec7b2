"""The stage graph is declared once (seqlm/stages.py): dvc.yaml and the flow must follow it."""
import inspect

import yaml

from flows.pipeline import upstream
from seqlm.params import load_params
from seqlm.stages import STAGES, render_dvc_yaml
from tasks import stage_task

from conftest import REPO


def test_committed_dvc_yaml_is_generated_from_the_stage_graph():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), \
        "dvc.yaml is stale: run `seqlm dvc-yaml` and commit it"


def test_dvc_yaml_declares_every_stage_with_its_paths():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [s.name for s in STAGES]
    for stage in STAGES:
        body = dvc[stage.name]["do"] if stage.foreach else dvc[stage.name]
        assert body["deps"] == list(stage.deps) and body["outs"] == list(stage.outs)
        assert body["cmd"].split()[:3] == ["seqlm", "stage", stage.name]


def test_every_stage_has_a_task_that_reads_params():
    params = load_params(REPO / "params.yaml")
    for stage in STAGES:
        task = stage_task(stage.name, params)
        assert task.name == stage.name
        first = next(iter(inspect.signature(task.fn).parameters.values()))
        assert first.name == "params"
        for dep in stage.deps:   # the task's own code is a declared dependency
            if dep.startswith("tasks/"):
                assert dep == f"tasks/{task.fn.__module__.split('.')[-1]}.py" or stage.name == "download"


def test_flow_edges_are_the_spec_dag():
    params = load_params(REPO / "params.yaml")
    edges = {(s.name, item): sorted(name for name, _ in upstream(s, item, params))
             for s in STAGES for item in s.items(params)}
    assert edges == {
        ("download", None): [],
        ("preprocess", None): ["download"],
        ("ngrams", None): ["preprocess"],
        ("sine", None): [],
        ("train_ar", None): ["sine"],
        ("train_lm", "rnn_scratch"): ["preprocess"],
        ("train_lm", "rnn"): ["preprocess"],
        ("evaluate", None): ["preprocess", "train_ar", "train_lm", "train_lm"],
    }
