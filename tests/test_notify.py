"""The parts of unattended runs that need no server: the data-change record from n-gram tables,
the notification block a URL gets, the automations file, and a run's time bound
(tests/test_unattended.py runs them on a real server and worker)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO
from seqlm import data_change
from seqlm.notify import TAG, NotifyError, load_automations, notification_block
from seqlm.params import load_params
from seqlm.runtime.deadline import AUTO_FACTOR, AUTO_FLOOR_MIN, Deadline, RunTimedOut, \
    bound_minutes, expected_minutes


def table(folder: Path, name: str, counts: dict[tuple[str, ...], int]) -> None:
    """An n-gram table as the ngrams stage writes it: token_1..token_n, count, rank."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(counts)))
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    columns = {f"token_{j + 1}": [gram[j] for gram, _ in ranked] for j in range(n)}
    columns["count"] = [count for _, count in ranked]
    columns["rank"] = list(range(1, len(ranked) + 1))
    pq.write_table(pa.table(columns), folder / f"{name}.parquet")


@pytest.mark.parametrize("old, new, expected", [
    ({("a",): 3, ("b",): 1}, {("b",): 1, ("a",): 3}, 0.0),            # the same distribution
    ({("a",): 5}, {("b",): 2}, 1.0),                                  # nothing in common
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4): (KL(p||m) + KL(q||m)) / 2
    ({("a",): 1, ("b",): 1}, {("a",): 7}, (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(2)
                                           + math.log2(1 / 0.75)) / 2),
    ({("a", "b"): 1, ("b", "a"): 1}, {("a", "b"): 2}, 0.31127812445913283),   # bigrams
])
def test_jensen_shannon_divergence_in_bits(tmp_path, old, new, expected):
    table(tmp_path / "old", "t", old)
    table(tmp_path / "new", "t", new)
    assert data_change.jensen_shannon(tmp_path / "old/t.parquet", tmp_path / "new/t.parquet") \
        == pytest.approx(expected, abs=1e-12)


def corpus_tables(folder: Path, text: str) -> None:
    """The four tables of a corpus `text` (character and word unigrams and bigrams)."""
    words = text.split()
    for level, tokens in (("char", list(text)), ("word", words)):
        for n in (1, 2):
            grams: dict[tuple[str, ...], int] = {}
            for i in range(len(tokens) - n + 1):
                grams[tuple(tokens[i:i + n])] = grams.get(tuple(tokens[i:i + n]), 0) + 1
            table(folder, f"{level}_{n}", grams)


def test_a_changed_corpus_is_described_by_size_characters_and_divergence(tmp_path):
    corpus_tables(tmp_path / "old", "the time traveller")
    corpus_tables(tmp_path / "new", "the time voyager came")
    change = data_change.describe(tmp_path / "old", tmp_path / "new")
    assert (change["chars_before"], change["chars_after"]) == (18, 21)
    assert (change["words_before"], change["words_after"]) == (3, 4)
    assert change["chars_new"] == ["c", "g", "o", "y"] and change["chars_gone"] == ["l"]
    divergence = change["jensen_shannon_bits"]
    assert set(divergence) == {"char_1", "char_2", "word_1", "word_2"}
    assert all(0 < value < 1 for value in divergence.values())
    assert divergence["word_2"] > divergence["word_1"] > divergence["char_1"]
    summary = data_change.summary(change)
    assert summary.startswith("corpus changed: 18 -> 21 (+16.67%) characters; 3 -> 4 (+33.33%) "
                              "words; characters new: 'c' 'g' 'o' 'y', gone: 'l'; ")
    assert "Jensen-Shannon divergence (bits, 0 to 1): char unigrams 0." in summary
    metrics = data_change.metrics(change)
    assert metrics["data_change.chars_new"] == 4 and metrics["data_change.jsd_word_2"] > 0


def test_the_same_corpus_or_nothing_to_compare_is_no_change(tmp_path):
    corpus_tables(tmp_path / "old", "the time traveller")
    corpus_tables(tmp_path / "new", "the time traveller")
    assert data_change.describe(tmp_path / "old", tmp_path / "new") is None
    assert data_change.describe(tmp_path / "none", tmp_path / "new") is None


def test_the_last_runs_tables_are_kept_while_the_stage_replaces_them(tmp_path):
    tables, kept = tmp_path / "data/ngrams", tmp_path / ".seqlm/previous-ngrams"
    assert not data_change.keep_previous(tables, kept)          # none yet: nothing kept
    corpus_tables(tables, "the time traveller")
    before = (tables / "word_2.parquet").read_bytes()
    assert data_change.keep_previous(tables, kept)
    assert sorted(p.name for p in kept.iterdir()) == \
        ["char_1.parquet", "char_2.parquet", "word_1.parquet", "word_2.parquet"]
    # the stage publishes new files by renaming them onto the old names
    corpus_tables(tmp_path / "fresh", "the time voyager")
    for path in (tmp_path / "fresh").iterdir():
        os.replace(path, tables / path.name)
    assert (kept / "word_2.parquet").read_bytes() == before
    assert data_change.describe(kept, tables)["chars_gone"] == ["l"]


def test_a_url_gets_the_block_that_sends_to_it():
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
    webhook = notification_block("https://example.invalid/hooks/abc?token=secret")
    assert isinstance(webhook, CustomWebhookNotificationBlock) and webhook.method == "POST"
    assert "secret" not in webhook.url and webhook.json_data == {"subject": "{{subject}}",
                                                                "body": "{{body}}"}
    for url in ("mailtos://user:pass@example.invalid?to=ops@example.invalid",
                "ntfy://seqlm-nightly", "https://hooks.slack.com/services/T000/B000/XXXX"):
        assert isinstance(notification_block(url), SlackWebhook), url   # Apprise's
    with pytest.raises(NotifyError, match="'nope://x': neither an Apprise URL"):
        notification_block("nope://x")


def test_the_repositorys_automations_send_through_the_block():
    block = "11111111-2222-3333-4444-555555555555"
    automations = {a.name: a for a in load_automations(block, REPO / "automations.yaml")}
    assert sorted(automations) == ["seqlm-champion-moved", "seqlm-champion-rejected",
                                   "seqlm-pipeline-failed"]
    assert not automations["seqlm-champion-rejected"].enabled
    failed = automations["seqlm-pipeline-failed"]
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                                     "prefect.flow-run.TimedOut"}
    for automation in automations.values():
        assert TAG in automation.tags
        assert [str(action.block_document_id) for action in automation.actions] == [block]


@pytest.mark.parametrize("mutate, expected", [
    (lambda a: a[0].update(triger={}), "automations.0 (seqlm-pipeline-failed): unknown key triger"),
    (lambda a: a[1]["actions"][0].update(type="send-pigeon"),
     "automations.1 (seqlm-champion-moved): an action of unknown type"),
    (lambda a: a[0]["actions"][0].update(body="{{ flow_run.name "),
     "automations.0 (seqlm-pipeline-failed): actions.0.body: not a valid template: "),
    (lambda a: a.append(dict(a[0])), "an automation name is used twice"),
])
def test_a_bad_automations_file_names_the_automation_and_key(tmp_path, mutate, expected):
    data = yaml.safe_load((REPO / "automations.yaml").read_text())
    mutate(data["automations"])
    path = tmp_path / "automations.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(NotifyError) as info:
        load_automations("11111111-2222-3333-4444-555555555555", path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value), info.value


def test_a_runs_bound_fits_its_work():
    params = load_params(REPO / "params.yaml")
    minutes, how = bound_minutes(params)
    assert minutes == max(AUTO_FLOOR_MIN, AUTO_FACTOR * expected_minutes(params))
    assert how.startswith("execution.timeout_minutes = auto: 4 x the ")
    # ten times the epochs: ten times the expected work, and a bound past the floor
    longer = params.model_copy(update={"train_lm": params.train_lm.model_copy(
        update={"epochs": 10 * params.train_lm.epochs})})
    assert expected_minutes(longer) == pytest.approx(10 * expected_minutes(params))
    assert bound_minutes(longer)[0] == AUTO_FACTOR * expected_minutes(longer) > AUTO_FLOOR_MIN
    fixed = params.model_copy(update={"execution": params.execution.model_copy(
        update={"timeout_minutes": 0.5})})
    assert bound_minutes(fixed) == (0.5, "execution.timeout_minutes = 0.5")


def test_a_passed_deadline_is_a_timeout_naming_the_bound():
    deadline = Deadline(0.0, "execution.timeout_minutes = 0.5")
    assert deadline.passed() and deadline.remaining() == 0
    with pytest.raises(RunTimedOut) as info:
        deadline.check("before its first stage")
    assert isinstance(info.value, TimeoutError)          # Prefect's engine: state TimedOut
    assert str(info.value) == ("the run passed its time bound of 0 s (execution.timeout_minutes "
                               "= 0.5) before its first stage")


def test_a_run_in_a_subflow_labels_the_run_a_deployment_started(prefect_server):
    """With execution.task_runner: dask the stages run in a subflow of the deployment's run:
    the labels a message reads go on that run."""
    from prefect import flow, get_client

    from seqlm.runtime.news import RunNews

    @flow
    def stages() -> None:
        RunNews().failed("train_lm[rnn]", RuntimeError("rnn: diverged\n at epoch 3"))

    @flow
    def outer() -> str:
        stages()
        from prefect.runtime import flow_run
        return flow_run.id

    outer_id = outer()
    with get_client(sync_client=True) as client:
        labels = client.read_flow_run(outer_id).labels
    assert labels["seqlm.failed_stage"] == "train_lm[rnn]"
    assert labels["seqlm.error"] == "RuntimeError: rnn: diverged at epoch 3"
