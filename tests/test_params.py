from pathlib import Path

import pytest
import yaml

from seqlm.params import ParamsError, load_params

from conftest import REPO


def _write(tmp_path: Path, mutate) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.train_lm.models == ["rnn_scratch", "rnn"]
    assert params.download.algorithm == "sha1"


@pytest.mark.parametrize("mutate, expected", [
    (lambda p: p["train_lm"].update(epochz=3), "train_lm.epochz = 3: Extra inputs are not permitted"),
    (lambda p: p.update(trainlm={}), "trainlm"),
    (lambda p: p["train_lm"].update(epochs="5"), "train_lm.epochs = '5'"),
    (lambda p: p["train_lm"].update(lr=0), "train_lm.lr = 0"),
    (lambda p: p["train_lm"].update(lr=-1.0), "train_lm.lr = -1.0"),
    (lambda p: p["train_lm"].update(epochs=0), "train_lm.epochs = 0"),
    (lambda p: p["train_lm"].update(hidden=0), "train_lm.hidden = 0"),
    (lambda p: p["train_lm"].update(models=["rnn", "transformer"]), "train_lm.models.1 = 'transformer'"),
    (lambda p: p["train_lm"].update(device="tpu"), "train_lm.device = 'tpu'"),
    (lambda p: p["ngrams"].update(max_n=0), "ngrams.max_n = 0"),
    (lambda p: p["download"].update(checksum="abc"), "download.checksum = 'abc'"),
    (lambda p: p["download"].pop("sources"), "download.sources: Field required"),
    (lambda p: p["train_lm"].update(sampling="shuffled"), "train_lm.sampling = 'shuffled'"),
    (lambda p: p["train_ar"].update(k_steps=[1, 4, 4]), "train_ar.k_steps = [1, 4, 4]: Value error, lists a horizon twice"),
    (lambda p: p["sine"].update(T=600), "sine.T = 600 is too short for train_ar: needs at least n_train + tau + max(k_steps) = 668"),
    (lambda p: p["evaluate"].update(prefixes=["time", ""]), "evaluate.prefixes.1 = '': String should have at least 1 character"),
    (lambda p: p["ngrams"].update(max_n=50), "ngrams.max_n = 50: Input should be less than or equal to 10"),
    (lambda p: p["evaluate"].update(ngram_orders=[40]), "evaluate.ngram_orders.0 = 40"),
    (lambda p: p["evaluate"].update(ngram_orders=[3, 3]), "evaluate.ngram_orders = [3, 3]: Value error, lists an order twice"),
    (lambda p: p["tracking"].update(experiment=""), "tracking.experiment = '': String should have at least 1 character"),
    (lambda p: p["tracking"].update(corpus_name="a/b"), "tracking.corpus_name = 'a/b': String should match pattern"),
    (lambda p: p["train_lm"].update(dropout=1.0), "train_lm.dropout = 1.0: Input should be less than 1"),
    (lambda p: p["train_lm"].update(lr_decay=0), "train_lm.lr_decay = 0"),
    (lambda p: p["train_lm"].update(patience=-1), "train_lm.patience = -1"),
    (lambda p: p["train_lm"].update(optimizer="rmsprop"), "train_lm.optimizer = 'rmsprop'"),
    (lambda p: p["train_lm"].update(hidden=1e9), "train_lm.hidden = 1000000000.0: Input should be a valid integer"),
    (lambda p: p["preprocess"].update(train_tokens=0), "preprocess.train_tokens = 0"),
    (lambda p: p["train_lm"].update(models=[]), "train_lm.models = []"),
    (lambda p: p["preprocess"].update(reserved_tokens=["<unk>", "a"]),
     "preprocess.reserved_tokens = ['<unk>', 'a']: Value error, '<unk>' is always index 0"),
    (lambda p: p["preprocess"].update(reserved_tokens=["<bos>", "<bos>"]),
     "preprocess.reserved_tokens = ['<bos>', '<bos>']: Value error, lists '<bos>' twice"),
    (lambda p: p["preprocess"].update(val_tokens=1), "preprocess.val_tokens = 1: Input should be "
                                                     "greater than or equal to 2"),
    (lambda p: p["download"].update(out="../../outside.txt"),
     "download.out = '../../outside.txt': Value error, '../../outside.txt' must be a relative "
     "path inside the repository"),
    (lambda p: p["download"].update(out="/tmp/abs.txt"), "download.out = '/tmp/abs.txt'"),
    (lambda p: p["execution"].update(timeout_minutes=0),
     "execution.timeout_minutes = 0: Value error, must be a number of minutes > 0, or auto"),
    (lambda p: p["execution"].update(timeout_minutes="never"),
     "execution.timeout_minutes = 'never': Value error, must be a number of minutes > 0, or auto"),
])
def test_bad_params_name_key_and_value(tmp_path, mutate, expected):
    with pytest.raises(ParamsError) as info:
        load_params(_write(tmp_path, mutate))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and message.startswith(str(tmp_path / "params.yaml"))


def test_unreadable_params_file(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(bad)


def test_digest_depends_only_on_the_keys_asked_for(tmp_path):
    base = load_params(REPO / "params.yaml")
    changed = load_params(_write(tmp_path, lambda p: p["train_lm"].update(epochs=7)))
    assert base.digest(["ngrams"]) == changed.digest(["ngrams"])
    assert base.digest(["train_lm.epochs"]) != changed.digest(["train_lm.epochs"])
    assert base.digest() != changed.digest()


@pytest.mark.parametrize("experiment, marker", [("full-corpus", "# full corpus"),
                                                ("shakespeare", "# shakespeare")])
def test_an_experiment_is_params_yaml_but_for_its_marked_keys(experiment: str, marker: str):
    from seqlm.tracking import flatten
    path = REPO / "experiments" / f"{experiment}.yaml"
    base = flatten(load_params(REPO / "params.yaml").model_dump(mode="json"))
    full = flatten(load_params(path).model_dump(mode="json"))
    changed = {key for key in base if base[key] != full[key]}
    marked = {line.split(":")[0].strip() for line in path.read_text().splitlines()
              if marker in line and not line.startswith("#")}
    assert {key.rsplit(".", 1)[-1] for key in changed} == marked
    assert full["preprocess.train_tokens"] is None
