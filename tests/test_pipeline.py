"""The flow end to end on a real Prefect test server and a real MLflow sqlite store."""
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from prefect import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                           ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
                                           FlowRunFilterName, TaskRunFilter, TaskRunFilterFlowRunId,
                                           TaskRunFilterName)

from typer.testing import CliRunner

from flows.pipeline import pipeline
from seqlm.cli import app
from seqlm import protocol
from seqlm.generate import load_trained, predict
from seqlm.params import load_params
from seqlm.text import Vocab
from seqlm.threads import training_slots
from seqlm.train import perplexity
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
                 "models/ar/kstep.csv", "reports/metrics/gru.json", "reports/summary.md",
                 "reports/plots/val_perplexity.csv", "reports/plots/comparison.png"]:
        assert (workdir / path).exists(), path
    assert sorted(p.name for p in (workdir / "reports/metrics").iterdir()) == [
        "gru.json", "kneser_ney_3gram.json", "rnn_scratch.json", "unigram.json"]
    curves = pd.read_csv(workdir / "reports/plots/val_perplexity.csv")
    # long form: a line per model trained, then each baseline named with its order
    assert list(curves.columns) == ["epoch", "model", "val_perplexity"]
    assert list(curves["model"].unique()) == ["rnn_scratch", "gru", "kneser_ney_3gram", "unigram"]
    assert curves.groupby("model")["epoch"].apply(list).to_dict() == {
        m: [1, 2, 3] for m in ("rnn_scratch", "gru", "kneser_ney_3gram", "unigram")}

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
    assert "gru.val_ppl_best" in parent.data.metrics and "unigram.val_ppl_best" in parent.data.metrics
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["timemachine"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ngrams", "reports", "vocab"} <= artifacts

    gru = children["gru"]
    # one name for one number: the training run, the pipeline run, the DVC metrics, the summary
    dvc_metrics = json.loads((workdir / "reports/metrics/gru.json").read_text())
    assert set(dvc_metrics) == {"best_epoch", "val_ppl_best", "val_nats_best", "val_bits_best",
                                "val_ppl_last", "train_ppl_last"}
    assert set(dvc_metrics) <= set(gru.data.metrics)
    assert {f"gru.{k}" for k in dvc_metrics} <= set(parent.data.metrics)
    assert set(dvc_metrics) <= set(pd.read_csv(workdir / "reports/summary.csv").columns)
    assert gru.data.metrics["val_ppl_best"] == pytest.approx(dvc_metrics["val_ppl_best"], rel=1e-3)
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
    # what is registered is the best-validation epoch: the same number in the history, the
    # registry and the evaluation table, and the kept weights are what the registry serves
    history = pd.read_csv(workdir / "models/gru/history.csv")
    summary = pd.read_csv(workdir / "reports/summary.csv").set_index("model")
    assert float(version.tags["val_perplexity"]) == history["val_perplexity"].min() == \
        summary.loc["gru", "val_ppl_best"]
    assert summary.loc["gru", "best_epoch"] == history["val_perplexity"].idxmin() + 1
    assert summary["scored_tokens"].nunique() == 1                 # one protocol for all
    assert re.search(r"^gru,3,\d+,", (workdir / "reports/summary.csv").read_text(), re.M)

    # the CLI generates the same text from the local folder and from the registry
    local = CliRunner().invoke(app, ["generate", "time traveller", "--model", "gru", "--num-chars", "10"])
    registry = CliRunner().invoke(app, ["generate", "time traveller", "--model",
                                        "models:/timemachine-gru@champion", "--num-chars", "10"])
    assert local.exit_code == 0 and registry.exit_code == 0, local.output + registry.output
    assert local.output.splitlines()[-1] == registry.output.splitlines()[-1] == text

    # the two trainings: side by side when the machine has a slot for each, one after the
    # other with one slot
    flow_run_id = parent.data.tags["prefect.flow_run_id"]       # this run's, not earlier tests'
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="train_lm["),
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
        tables = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["perplexity-summary"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    spans = sorted((r.start_time, r.end_time) for r in runs)
    # (tiny trainings may finish before the other starts: only the one-slot case is certain)
    assert len(spans) == 2
    if training_slots(load_params()) == 1:
        assert spans[0][1] <= spans[1][0], spans
    # the evaluation summary is a Prefect table artifact: each model beside the baselines
    assert len(tables) == 1 and tables[0].type == "table"
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    assert [r["model"] for r in rows] == ["rnn_scratch", "gru", "kneser_ney_3gram", "unigram"]

    # one name for both tools, and links between them
    with get_client(sync_client=True) as prefect:   # the session's server: filter by run
        [flow_run] = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[parent.info.run_name])))
        [link] = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["mlflow-run"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
        task_runs = {r.name.rsplit("-", 1)[0]: r for r in prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))}
    assert parent.info.run_name == flow_run.name
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-\d{6}-[0-9a-f]{8}", flow_run.name)
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert parent.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run.id}")
    assert parent.info.run_id in link.data and link.type == "markdown"
    # the DAG of the SPEC, as Prefect records it from the futures each task waited for
    def inputs(label: str) -> set[str]:
        ids = {i.id for deps in task_runs[label].task_inputs.values() for i in deps}
        return {name for name, r in task_runs.items() if r.id in ids}
    assert inputs("download") == inputs("sine") == set()
    assert inputs("preprocess") == {"download"}
    assert inputs("ngrams") == {"preprocess"} and inputs("train_ar") == {"sine"}
    assert inputs("train_lm[gru]") == inputs("train_lm[rnn_scratch]") == {"preprocess"}
    assert inputs("evaluate") == {"preprocess", "train_ar", "train_lm[gru]",
                                  "train_lm[rnn_scratch]"}
    # and the short stages are not queued behind the trainings: they start while both train
    first_training_end = min(task_runs[f"train_lm[{m}]"].end_time for m in ("gru", "rnn_scratch"))
    for label in ("ngrams", "sine", "train_ar"):
        assert task_runs[label].start_time < first_training_end, label
    # MLflow opens on training runs; each child run ends with its stage, with system metrics,
    # its continuations, and a model named after it; no hidden files, no DVC tag flood
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for name, child in children.items():
        stage = task_runs["train_ar" if name == "ar_mlp" else f"train_lm[{name}]"]
        assert child.info.start_time / 1000 >= stage.start_time.timestamp() - 1
        assert child.info.end_time / 1000 <= stage.end_time.timestamp() + 30
    assert any(key.startswith("system/") for key in gru.data.metrics)
    assert "samples.json" in {a.path for a in client.list_artifacts(gru.info.run_id)}
    assert [m.name for m in client.search_logged_models([experiment.experiment_id])] >= ["gru"]
    assert version.description and "greedy" in version.description
    assert client.get_registered_model("timemachine-gru").description
    assert not [k for k in parent.data.tags if k.startswith("dvc.")]
    ngram_files = {a.path for a in client.list_artifacts(parent.info.run_id, "ngrams")}
    assert "ngrams/zipf.png" in ngram_files             # a folder under its own name, once
    assert not [path for path in ngram_files if path.rsplit("/", 1)[-1].startswith(".")]
    assert "reports/summary.md" in {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                          "reports")}
    assert "ar/kstep.png" in {a.path for a in client.list_artifacts(
        children["ar_mlp"].info.run_id, "ar")}
    runs_before = len(client.search_runs([experiment.experiment_id]))

    # nothing changed: every stage is skipped; the run is still tracked, and adds no model runs
    again = pipeline(params_file="params.yaml", record_dvc=False)
    assert set(again.values()) == {"Cached"}
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == runs_before + 1 and "mlflow.parentRunId" not in runs[0].data.tags
    assert runs[0].data.tags["cached_stages"] == (
        "download, preprocess, ngrams, sine, train_ar, train_lm[rnn_scratch], train_lm[gru], "
        "evaluate")                                     # the stage graph's order, every run
    assert runs[0].data.tags["cached_by.train_lm.gru"] == gru.info.run_id
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

    # The store moves with its clone: a copy in another folder, with the original gone, loads
    # the champion and the pipeline run's artifacts in a new process (relative_artifacts.py)
    moved, gone = workdir.parent / f"{workdir.name}-moved", workdir.parent / f"{workdir.name}-gone"
    shutil.copytree(workdir, moved)
    workdir.rename(gone)
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{moved}/mlflow.db"}
        check = subprocess.run([sys.executable, "-c", LOAD_FROM_THE_STORE], cwd=moved, env=env,
                               capture_output=True, text=True, timeout=300)
    finally:
        gone.rename(workdir)
    assert check.returncode == 0, check.stderr[-3000:]
    continuation, summary = check.stdout.split("\n", 1)
    assert continuation == text and summary.startswith("# Evaluation")


LOAD_FROM_THE_STORE = """
import mlflow
from mlflow import MlflowClient
model = mlflow.pyfunc.load_model("models:/timemachine-gru@champion")
print(model.predict({"prefix": ["time traveller"], "num_chars": [10]})[0])
client = MlflowClient()
first = client.search_runs([client.get_experiment_by_name("seqlm").experiment_id],
                           "tags.`seqlm.run` = 'pipeline'", order_by=["attributes.start_time"])[0]
print(open(client.download_artifacts(first.info.run_id, "reports/summary.md", ".")).read())
"""


def test_an_unreachable_mlflow_store_fails_in_seconds_before_any_stage(
        workdir, prefect_server, monkeypatch):
    write_params(workdir, **SMALL)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/")  # discard port: refused
    start = time.monotonic()
    with pytest.raises(TrackingError, match="MLflow store 'http://127.0.0.1:9/' does not answer "
                                            ".*Fix MLFLOW_TRACKING_URI"):
        pipeline(params_file="params.yaml", record_dvc=False)
    assert time.monotonic() - start < 30
    assert not (workdir / "data/raw").exists()


def test_a_store_failing_mid_run_keeps_every_artifact(workdir, prefect_server, monkeypatch):
    """The store answers at start-up, then fails on every call: the stages still write their
    artifacts and the run ends with the error and how to fix the URI."""
    write_params(workdir, **SMALL)
    write_params(workdir, train_lm={"models": ["rnn"]})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")

    def broken_store(self, *args, **kwargs):
        raise ConnectionError("the store went away")
    monkeypatch.setattr(MlflowClient, "log_batch", broken_store)
    monkeypatch.setattr(MlflowClient, "set_terminated", broken_store)   # runs cannot be ended
    with pytest.raises(TrackingError, match="failed .*ConnectionError: the store went away.* all "
                                            "pipeline artifacts were written. Fix MLFLOW_TRACKING_URI"):
        pipeline(params_file="params.yaml", record_dvc=False)
    assert (workdir / "reports/summary.md").exists()
    assert (workdir / "models/rnn/model.pt").exists()
    # the store is back: the next run logs and registers the trainings whose logging failed
    # (their records say so), and reuses every other stage
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    states = pipeline(params_file="params.yaml", record_dvc=False)
    assert states["train_lm[rnn]"] == states["train_ar"] == "Completed"
    assert states["ngrams"] == states["preprocess"] == "Cached"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert int(client.get_model_version_by_alias("timemachine-rnn", "champion").version) == 1
    runs = client.search_runs([client.get_experiment_by_name("seqlm").experiment_id])
    # the failed run's MLflow runs, left RUNNING, are closed by the next run, with the reason
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert {r.info.status for r in runs} == {"FINISHED", "FAILED"} and len(failed) == 3
    assert all("ended without closing this run" in r.data.tags["failure_reason"] for r in failed)


TINY = dict(SMALL, train_lm={"epochs": 2, "hidden": 16, "checkpoint_every": 2, "models": ["rnn"]})


def test_scheduled_retraining_follows_the_content_of_an_unpinned_source(
        small_pipeline, workdir, monkeypatch):
    """download.checksum unset: every run fetches the source; only a change of its content runs
    the later stages again, and the champion moves only to a model better on the new text."""
    from test_download import Server
    write_params(workdir, **TINY)
    v1 = (workdir / "data/mirror/timemachine.txt").read_bytes()
    v2 = v1.replace(b"Time Traveller", b"Time Voyager")        # also in the validation text
    with Server().running() as server:
        write_params(workdir, download={"sources": [server.url("/timemachine.txt")],
                                        "checksum": None})
        client = MlflowClient(small_pipeline)
        states, datasets = [], []
        since = datetime.datetime.now(datetime.timezone.utc)
        for content in (v1, v1, v2):
            server.plans["/timemachine.txt"] = [content]
            states.append(pipeline(params_file="params.yaml", record_dvc=False))
            versions = client.search_model_versions("name='timemachine-rnn'")
            datasets.append(len(versions))
        assert server.hits["/timemachine.txt"] == 3
    first, same, changed = states
    assert set(first.values()) == {"Completed"}
    assert same["download"] == "Completed"                   # fetched again ...
    assert {s for k, s in same.items() if k != "download"} == {"Cached"}   # ... nothing else ran
    assert all(changed[k] == "Completed" for k in ("preprocess", "ngrams", "train_lm[rnn]",
                                                   "evaluate"))
    assert changed["sine"] == changed["train_ar"] == "Cached"
    assert datasets == [1, 1, 2]                             # a new model version for new data
    assert (workdir / "data/raw/timemachine.txt").read_bytes() == v2
    assert (workdir / "data/raw/timemachine.txt.sha256").read_text().split()[0] == \
        hashlib.sha256(v2).hexdigest()
    # the parent run records the content's sha256 with the dataset
    parents = [r for r in client.search_runs([client.get_experiment_by_name("seqlm").experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    latest = max(parents, key=lambda r: r.info.start_time)
    [corpus] = latest.inputs.dataset_inputs
    assert {t.key: t.value for t in corpus.tags}["sha256"] == hashlib.sha256(v2).hexdigest()
    # the champion is the better of the two on the new validation text
    meta = json.loads((workdir / "models/rnn/meta.json").read_text())
    old = mlflow.pyfunc.load_model("models:/timemachine-rnn/1").unwrap_python_model()
    corpus_ids = np.load(workdir / "data/processed/corpus_char.npy")
    text = protocol.validation_text(corpus_ids, protocol.Split(10_000, 15_000))
    vocab = Vocab.load(workdir / "data/processed/vocab_char.parquet")
    old_ids = np.asarray(old.vocab[vocab.to_tokens(text.tolist())])
    old_ppl = perplexity(old.model, old_ids, protocol.CONTEXT, "cpu")
    champion = int(client.get_model_version_by_alias("timemachine-rnn", "champion").version)
    assert champion == (2 if meta["best_val_perplexity"] < old_ppl else 1), (meta, old_ppl)
    # what changed in the data, in the run that fetched the new content only
    changes = [r.data.metrics.get("data_change.jsd_word_1") for r in
               sorted(parents, key=lambda r: r.info.start_time)[-3:]]
    assert changes[:2] == [None, None] and 0 < changes[2] < 1, changes
    assert latest.data.metrics["data_change.chars_before"] == 170_580
    # each "Time Traveller" became two characters shorter
    assert latest.data.metrics["data_change.chars_after"] == \
        170_580 - 2 * v1.count(b"Time Traveller")
    with get_client(sync_client=True) as prefect_client:
        labels = prefect_client.read_flow_run(latest.data.tags["prefect.flow_run_id"]).labels
    assert labels["seqlm.data_change"].startswith("corpus changed: 170,580 -> "), labels
    # one champion event per training that ran, the last one telling that change
    decisions = champion_events(since)
    assert [e.event for e in decisions][0] == "seqlm.champion.moved"
    assert [e.payload["version"] for e in decisions] == ["1", "2"], decisions
    assert decisions[0].payload["data_change"] is None
    assert decisions[1].payload["data_change"] == labels["seqlm.data_change"]
    assert decisions[1].event == ("seqlm.champion.moved" if champion == 2
                                  else "seqlm.champion.rejected")


def champion_events(since: datetime.datetime) -> list:
    """The champion events emitted since `since` (once the server has stored them)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from prefect.events.worker import EventsWorker
    EventsWorker.drain_all(at_exit=False)
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            event_filter = EventFilter(event=EventNameFilter(prefix=["seqlm.champion."]),
                                       occurred=EventOccurredFilter(since=since))
            events = sorted(client.read_events(event_filter, limit=50).events,
                            key=lambda e: e.occurred)
            if len(events) >= 2 or time.monotonic() > deadline:
                return events
            time.sleep(1)


def test_a_second_corpus_by_params_alone_trains_its_own_models(small_pipeline, workdir):
    write_params(workdir, **TINY)
    pipeline(params_file="params.yaml", record_dvc=False)
    client = MlflowClient(small_pipeline)
    champion = client.get_model_version_by_alias("timemachine-rnn", "champion")
    # another text, other characters' frequencies: another vocabulary order and other ids
    lines = (workdir / "data/mirror/timemachine.txt").read_text().splitlines()
    (workdir / "data/mirror/reversed.txt").write_text("\n".join(l[::-1] for l in lines) + "\n")
    write_params(workdir, download={"sources": ["data/mirror/reversed.txt"], "checksum": None,
                                    "out": "data/raw/reversed.txt"})
    states = pipeline(params_file="params.yaml", record_dvc=False)
    assert states["train_lm[rnn]"] == "Completed"             # no stale checkpoint in the way
    assert int(client.get_model_version_by_alias("reversed-rnn", "champion").version) == 1
    assert client.get_model_version_by_alias("timemachine-rnn", "champion").version == \
        champion.version
    assert len(list((workdir / "checkpoints/rnn").glob("*.pt"))) == 2   # both kept


def test_trainings_take_the_runs_slots_one_at_a_time_when_there_is_one(small_pipeline, workdir):
    """train_lm.cpu_threads = every core: one training slot, so the trainings run one after the
    other (the short stages do not wait for them); the slots are gone with the run."""
    from seqlm.threads import cores
    write_params(workdir, train_lm={"cpu_threads": cores(), "models": ["rnn", "gru"]})
    assert training_slots(load_params()) == 1
    states = pipeline(params_file="params.yaml", record_dvc=False)
    assert set(states.values()) == {"Completed"}
    client = MlflowClient(small_pipeline)
    runs = client.search_runs([client.get_experiment_by_name("seqlm").experiment_id])
    flow_run = next(r for r in runs if r.data.tags.get("seqlm.run")).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        trainings = sorted((r.start_time, r.end_time) for r in prefect.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train_lm["),
                                          flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run]))))
        limits = [limit.name for limit in prefect.read_global_concurrency_limits()]
    trained = sorted((r.info.start_time, r.info.end_time) for r in runs
                     if r.info.run_name in ("rnn", "gru"))
    assert len(trainings) == 2 and trained[0][1] <= trained[1][0], trained   # one at a time
    assert f"training-{flow_run}" not in limits
