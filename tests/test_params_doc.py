"""docs/parameters.md is generated from seqlm/params.py: the page and the schema stay equal."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqlm.cli import app
from seqlm.params import Params, TrainLmParams
from seqlm.params_doc import DOC_FILE, UndocumentedField, render

from conftest import REPO


def test_the_committed_parameter_page_is_what_the_schema_generates():
    assert (REPO / DOC_FILE).read_text(encoding="utf-8") == render(REPO / "params.yaml"), \
        "docs/parameters.md is stale: run `seqlm params-doc` and commit it"


def test_the_page_lists_every_key_with_its_default_and_bounds():
    page = render(REPO / "params.yaml")
    for section, field in Params.model_fields.items():
        keys = getattr(field.annotation, "model_fields", None)
        for key in keys or [section]:
            name = f"{section}.{key}" if keys else key
            assert f"| `{name}` |" in page, name
    assert "| `train_lm.epochs` | int (> 0) | `500` |" in page
    assert "| `train_lm.dropout` | float (≥ 0, < 1) | `0.0` |" in page
    assert "| `ngrams.shard_tokens` | int (≥ 1000) or `null` | `null` |" in page
    assert "`rnn_scratch` \\| `rnn` \\| `gru` \\| `lstm`; at least 1 item" in page
    assert "required; params.yaml: `data/raw/timemachine.txt`" in page


def test_a_key_without_a_description_stops_the_generator(monkeypatch):
    monkeypatch.setattr(TrainLmParams.model_fields["epochs"], "description", None)
    with pytest.raises(UndocumentedField, match=r"train_lm\.epochs has no Field\(description"):
        render(REPO / "params.yaml")


def test_params_doc_check_names_a_stale_page_and_writing_fixes_it(tmp_path: Path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / DOC_FILE).write_text("# an old page\n")
    monkeypatch.chdir(tmp_path)
    stale = CliRunner().invoke(app, ["params-doc", "--check"])
    assert stale.exit_code == 2
    assert "docs/parameters.md is out of date with seqlm/params.py: run `seqlm params-doc`" \
        in stale.output
    assert CliRunner().invoke(app, ["params-doc"]).exit_code == 0
    current = CliRunner().invoke(app, ["params-doc", "--check"])
    assert current.exit_code == 0, current.output
    assert (tmp_path / DOC_FILE).read_text(encoding="utf-8") == render()
