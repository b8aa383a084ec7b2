"""The stage graph is declared once (seqlm/stages.py): dvc.yaml and the flow must follow it."""
import ast
import inspect
import json
import re
from pathlib import Path

import yaml

from seqlm.params import MODEL_NAMES, load_params
from seqlm.stages import CURVES_TEMPLATE, STAGES, nodes, render_dvc_yaml
from tasks import task_of

from conftest import REPO


def test_committed_dvc_yaml_is_generated_from_the_stage_graph():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), \
        "dvc.yaml is stale: run `seqlm dvc-yaml` and commit it"


def test_the_curves_template_orders_every_model():
    # a model's colour comes from its place in this list: the same on every chart
    template = json.loads((REPO / CURVES_TEMPLATE).read_text())
    rank = next(t["calculate"] for t in template["transform"] if t.get("as") == "rank")
    assert re.fullmatch(r"indexof\(\[(.*)\], datum\.model\)", rank)[1].split(", ") == [
        f"'{model}'" for model in MODEL_NAMES]


def test_dvc_yaml_declares_every_stage_with_its_paths():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [s.name for s in STAGES]
    for stage in STAGES:
        body = dvc[stage.name]["do"] if stage.foreach else dvc[stage.name]
        uncached = [{path: {"cache": False}}
                    for path in (*stage.plots.values(), *stage.reports.values())]
        assert body["deps"] == [*stage.deps.values(), *stage.code]
        assert body["outs"] == [*stage.outs.values(), *uncached]
        assert body["cmd"].split()[:3] == ["seqlm", "stage", stage.name]


# What runs a stage without deciding its outputs: how params are read, files written, stages
# named and recorded, a run interrupted or checked up front, where a training runs (own_process:
# tested to give the same bits as in a thread), and what goes to MLflow. Its own imports are
# not followed.
PLUMBING = {"seqlm/params.py", "seqlm/io.py", "seqlm/stages.py", "seqlm/tracking.py",
            "seqlm/mlflow_model.py", "seqlm/interrupt.py", "seqlm/runtime/own_process.py",
            "seqlm/runtime/records.py", "seqlm/runtime/preflight.py", "seqlm/runtime/session.py"}


def _seqlm_imports(path: Path, seen: set[str]) -> set[str]:
    """seqlm/*.py files that `path` imports, directly or through other seqlm modules."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seqlm"):
            names = [node.module] if node.module != "seqlm" else [f"seqlm.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("seqlm.")]
        for name in names:
            file = name.replace(".", "/") + ".py"
            if file not in seen and (REPO / file).exists():
                seen.add(file)
                if file not in PLUMBING:
                    _seqlm_imports(REPO / file, seen)
    return seen


def test_every_stage_has_a_task_and_declares_the_code_it_runs():
    params = load_params(REPO / "params.yaml")
    for stage in STAGES:
        task = task_of(stage.name, params)
        assert task.name == stage.name
        first = next(iter(inspect.signature(task.fn).parameters.values()))
        assert first.name == "params"
        module = f"tasks/{task.fn.__module__.split('.')[-1]}.py"
        code = {module} | _seqlm_imports(REPO / module, set())
        missing = code - PLUMBING - set(stage.code)
        assert not missing, f"stage {stage.name} runs {sorted(missing)} but does not declare it"


def test_flow_edges_are_the_spec_dag():
    params = load_params(REPO / "params.yaml")
    edges = {node.label: sorted(node.upstream) for node in nodes(params)}
    assert edges == {
        "download": [],
        "preprocess": ["download"],
        "ngrams": ["preprocess"],
        "sine": [],
        "train_ar": ["sine"],
        "train_lm[rnn_scratch]": ["preprocess"],
        "train_lm[rnn]": ["preprocess"],
        "evaluate": ["preprocess", "train_ar", "train_lm[rnn]", "train_lm[rnn_scratch]"],
    }


def test_a_path_is_read_by_its_name():
    params = load_params(REPO / "params.yaml")
    paths = STAGES[-2].at(params, "gru")
    assert paths.outs.model == paths.outs["model"] == "models/gru"
    assert STAGES[1].at(params).deps.corpus == "data/raw/timemachine.txt"
