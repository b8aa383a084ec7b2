"""MLflow tracking against a real sqlite store: registry alias rule and the DVC hash tags."""
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from seqlm.models import TorchRNN
from seqlm.params import load_params
from seqlm import tracking
from seqlm.tracking import Run
from tasks.download import download
from tasks.preprocess import preprocess
from tasks.train_lm import train_lm

from conftest import write_params


@pytest.fixture
def trained_rnn(workdir: Path) -> Path:
    write_params(workdir, train_lm={"epochs": 1, "hidden": 8, "models": ["rnn"]})
    params = load_params()
    download.fn(params)
    preprocess.fn(params)
    train_lm.fn(params, "rnn")
    return workdir / "models" / "rnn"


def test_champion_alias_moves_only_to_a_better_model(trained_rnn, workdir, caplog):
    uri = f"sqlite:///{workdir / 'registry.db'}"     # not the store the stage registered in
    client = MlflowClient(uri)
    errors = []
    rescored: list[tuple[type, int]] = []
    champion_on_new_text = 7.0

    def rescore(model: torch.nn.Module, vocab) -> float:
        rescored.append((type(model), len(vocab)))
        return champion_on_new_text

    def register(val_perplexity: float, retrain: bool = True, digest: str = "text-A") -> int:
        if retrain:  # other weights: a new model, as after a change of params
            saved = torch.load(trained_rnn / "model.pt", weights_only=True)
            saved["state_dict"] = {k: v + 0.01 for k, v in saved["state_dict"].items()}
            torch.save(saved, trained_rnn / "model.pt")
        run = Run(load_params(), "rnn", uri=uri)
        run.open({})
        version = tracking.register_language_model(run, trained_rnn, "rnn", val_perplexity,
                                                   digest, rescore, "a test version")
        errors.append(run.error)
        return int(version)

    def champion() -> int:
        return int(client.get_model_version_by_alias("timemachine-rnn", "champion").version)

    assert register(5.0) == 1
    assert register(6.0) == 2          # worse: registered, but the champion stays
    assert register(5.0) == 3          # equal is not better
    assert champion() == 1
    assert register(4.5) == 4
    assert champion() == 4
    # the same weights again (a cached stage, or a re-run after an MLflow outage): no new version
    assert register(4.5, retrain=False) == 4
    assert len(client.search_model_versions("name='timemachine-rnn'")) == 4
    assert rescored == []              # same validation text: the tags are compared
    # other validation text (another version of the corpus, another split): the champion is
    # loaded from the registry and scored on the new text first, its weights read as data: the
    # Python code stored beside them (planted here) does not run
    marker = workdir / "planted-code-ran"
    planted = [path for path in workdir.rglob("*.py")
               if path.name in {"pyfunc_model.py", "mlflow_model.py"} and "artifacts" in str(path)]
    assert planted
    for path in planted:
        path.write_text(f"open({str(marker)!r}, 'w').close()\n" + path.read_text())
    assert register(8.0, digest="text-B") == 5
    assert not marker.exists()
    assert champion() == 4 and rescored == [(TorchRNN, 28)]
    assert register(6.5, digest="text-B") == 6
    assert champion() == 6 and len(rescored) == 2
    assert client.get_model_version("timemachine-rnn", "6").tags["val_digest"] == "text-B"
    # a validation text too short to mean anything decides nothing: registered, alias kept
    write_params(workdir, preprocess={"val_tokens": 999})
    with caplog.at_level("INFO", logger="seqlm.tracking"):
        assert register(1.0, digest="text-C") == 7
    assert champion() == 6
    assert "timemachine-rnn v7 is registered but cannot be champion: its validation text has " \
           "999 tokens, fewer than the 1000 a comparison needs (preprocess.val_tokens)" \
           in caplog.messages
    assert set(errors) == {None}


def test_registered_names_follow_the_corpus(workdir):
    assert load_params().corpus_name == "timemachine"          # the first source's file name
    write_params(workdir, download={"sources": ["https://example.org/data/tiny%20shakespeare.txt",
                                                "data/mirror/shakespeare.txt"]})
    assert load_params().corpus_name == "tiny-shakespeare"
    write_params(workdir, tracking={"corpus_name": "bard"})
    assert load_params().corpus_name == "bard"


def test_failing_store_is_remembered_not_raised(workdir):
    (workdir / "blocker").write_text("a file where the store's folder should be")
    run = Run(load_params(), "pipeline", uri=f"sqlite:///{workdir / 'blocker' / 'm.db'}")
    assert run.open({}) is None
    assert run.error is not None
    run.log_metrics({"x": 1.0})             # no-ops once disabled
    run.finish()
    assert run.run_id is None


def test_a_run_shorter_than_one_sampling_interval_still_gets_system_metrics(workdir):
    # MLflow's monitor publishes after its first 1 s interval; a training that ended sooner
    # left the run's System metrics tab empty (seen on a 3-epoch run in CI)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    write_params(workdir)
    run = Run(load_params(), "rnn", uri=uri)
    run.open({})
    with tracking.system_metrics(run):
        pass
    run.finish()
    metrics = MlflowClient(uri).get_run(run.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and \
        "system/system_memory_usage_megabytes" in metrics, metrics
