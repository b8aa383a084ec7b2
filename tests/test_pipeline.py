"""The flow end to end on a real Prefect test server and a real MLflow sqlite store."""
import json
import shutil

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from prefect import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, TaskRunFilter,
                                           TaskRunFilterName)

from typer.testing import CliRunner

from flows.pipeline import pipeline
from seqlm.cli import app
from seqlm.generate import load_trained, predict
from seqlm.tracking import TrackingError

from conftest import write_params

pytestmark = pytest.mark.slow

SMALL = dict(
    ngrams={"max_n": 2},
    train_ar={"epochs": 2},
    train_lm={"epochs": 3, "hidden_scratch": 32, "hidden": 32, "checkpoint_every": 2,
              "models": ["rnn_scratch", "gru"]},
    evaluate={"num_chars": 10},
)


@pytest.fixture
def small_pipeline(workdir, prefect_server, monkeypatch):
    write_params(workdir, **SMALL)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_pipeline_runs_logs_and_skips_unchanged_stages(small_pipeline, workdir):
    states = pipeline(params_file="params.yaml", record_dvc=False)
    assert set(states) == {"download", "preprocess", "ngrams", "sine", "train_ar",
                           "train_lm[rnn_scratch]", "train_lm[gru]", "evaluate"}
    assert set(states.values()) == {"Completed"}
    for path in ["data/raw/timemachine.txt", "data/ngrams/word_2.parquet", "models/gru/model.pt",
                 "models/ar/kstep.csv", "reports/metrics.json", "reports/summary.md"]:
        assert (workdir / path).exists(), path
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    assert set(metrics["lm"]) == {"rnn_scratch", "gru"}

    client = MlflowClient(small_pipeline)
    experiment = client.get_experiment_by_name("seqlm")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"ar_mlp", "rnn_scratch", "gru"}
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train_lm.epochs"] == "3"
    assert len(parent.data.tags["git_commit"]) > 0 and len(parent.data.tags["params_hash"]) == 16
    assert "word_1_zipf_exponent" in parent.data.metrics
    assert any(name.startswith("lm.gru.val") for name in parent.data.metrics)
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["timemachine"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ngrams", "reports", "vocab"} <= artifacts

    gru = children["gru"]
    history = client.get_metric_history(gru.info.run_id, "val_perplexity")
    assert [m.step for m in history] == [1, 2, 3]
    assert gru.data.tags["device"] == "cpu"
    assert {"perplexity.png", "history.csv", "meta.json"} <= {
        a.path for a in client.list_artifacts(gru.info.run_id)}
    assert {d.dataset.name for d in gru.inputs.dataset_inputs} == {
        "timemachine-chars-training", "timemachine-chars-validation"}

    # the registered model loads back through MLflow and generates what the local model does
    version = client.get_model_version_by_alias("timemachine-gru", "champion")
    loaded = mlflow.pyfunc.load_model("models:/timemachine-gru@champion")
    text = loaded.predict(pd.DataFrame({"prefix": ["time traveller"], "num_chars": [10]}))[0]
    model, vocab, _ = load_trained(workdir / "models/gru", device="cpu")
    assert text == predict("time traveller", 10, model, vocab, torch.device("cpu"))
    assert version.tags["val_perplexity"]

    # the CLI generates the same text from the local folder and from the registry
    local = CliRunner().invoke(app, ["generate", "time traveller", "--model", "gru", "--num-chars", "10"])
    registry = CliRunner().invoke(app, ["generate", "time traveller", "--model",
                                        "models:/timemachine-gru@champion", "--num-chars", "10"])
    assert local.exit_code == 0 and registry.exit_code == 0, local.output + registry.output
    assert local.output.splitlines()[-1] == registry.output.splitlines()[-1] == text

    # the two training tasks (tag "gpu", one slot on a CPU machine) never overlapped
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="train_lm[")))
        tables = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["perplexity-summary"])))
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]
    # the evaluation summary is a Prefect table artifact: each model beside the baselines
    assert len(tables) == 1 and tables[0].type == "table"
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    assert [r["model"] for r in rows] == ["rnn_scratch", "gru", "kneser_ney_3gram", "unigram"]

    # nothing changed: every stage is skipped; the run is still tracked
    again = pipeline(params_file="params.yaml", record_dvc=False)
    assert set(again.values()) == {"Cached"}
    # ... and an unchanged model is not registered again, so the champion stays put
    assert [int(v.version) for v in client.search_model_versions("name='timemachine-gru'")] == [1]
    assert int(client.get_model_version_by_alias("timemachine-gru", "champion").version) == 1
    # a deleted output makes its stage (and only the stages reading it) run again
    shutil.rmtree(workdir / "data/ngrams")
    write_params(workdir, evaluate={"num_chars": 12})
    third = pipeline(params_file="params.yaml", record_dvc=False)
    assert third["ngrams"] == "Completed" and third["evaluate"] == "Completed"
    assert third["train_lm[gru]"] == "Cached" and third["download"] == "Cached"
    # back to the first params: their cached result exists, but the outputs on disk are those of
    # num_chars=12, so evaluate must run again rather than reuse it
    write_params(workdir, evaluate={"num_chars": 10})
    fourth = pipeline(params_file="params.yaml", record_dvc=False)
    assert fourth["evaluate"] == "Completed" and fourth["ngrams"] == "Cached"
    samples = json.loads((workdir / "reports/samples.json").read_text())
    assert len(samples["gru"]["traveller"]["greedy"]) == len("traveller") + 10
    # an edited output is not mistaken for the stage's own
    (workdir / "models/ar/kstep.csv").write_text("k,mse\n1,0.0\n")
    assert pipeline(params_file="params.yaml", record_dvc=False)["train_ar"] == "Completed"


def test_unreachable_mlflow_store_still_writes_artifacts(workdir, prefect_server, monkeypatch):
    write_params(workdir, **SMALL)
    write_params(workdir, train_lm={"models": ["rnn"]})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/")  # discard port: refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(TrackingError, match="MLflow store 'http://127.0.0.1:9/' failed .* all "
                                            "pipeline artifacts were written. Fix MLFLOW_TRACKING_URI"):
        pipeline(params_file="params.yaml", record_dvc=False)
    assert (workdir / "reports/summary.md").exists()
    assert (workdir / "models/rnn/model.pt").exists()
