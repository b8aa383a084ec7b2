"""What a person sees, in headless Chromium with a fresh profile (a browser that never saw
MLflow or Prefect) and no network: the links `seqlm ui` prints after a real `seqlm run`, and the
page `dvc plots show` writes. Checked by the DOM's text, not by eye.

Needs Chromium (Debian's `chromium`); without it these tests are skipped, unless
SEQLM_REQUIRE_BROWSER=1 (CI sets it) makes that a failure."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from test_dvc import _dvc
from test_serve import free_port

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    if CHROMIUM is None:
        if os.environ.get("SEQLM_REQUIRE_BROWSER"):
            pytest.fail("SEQLM_REQUIRE_BROWSER is set and no chromium is on PATH")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    profiles = tmp_path_factory.mktemp("profiles")

    def dom(url: str) -> str:
        """The page's DOM after its scripts ran (20 s of virtual time), in a new profile, with
        every host but 127.0.0.1 unresolvable."""
        profile = profiles / str(len(list(profiles.iterdir())))
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--virtual-time-budget=20000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout
    return dom


def text_of(dom: str) -> str:
    dom = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


@pytest.fixture
def ran(after_small_run: tuple[Path, dict]) -> tuple[Path, dict]:
    """A clone after one `seqlm run` on small params (conftest.py: shared with other tests)."""
    return after_small_run


def test_seqlm_ui_links_open_the_training_view_of_this_clone(ran, browser):
    root, env = ran
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("seqlm").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    rnn = next(r for r in runs if r.info.run_name == "rnn")
    mlflow_port, prefect_port = free_port(), free_port()
    ui = subprocess.Popen([sys.executable, "-m", "seqlm.cli", "ui", "--mlflow-port",
                           str(mlflow_port), "--prefect-port", str(prefect_port)], cwd=root,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed = []
        while not printed or not printed[-1].startswith("Ctrl-C"):
            line = ui.stdout.readline()
            assert line, "".join(printed)
            printed.append(line)
        links = dict(re.findall(r"^(MLflow runs|Prefect runs): +(\S+)$", "".join(printed), re.M))
        models = re.findall(r"^MLflow model: +(\S+)$", "".join(printed), re.M)

        experiment = text_of(browser(links["MLflow runs"]))
        # the model-training view: its sidebar, the runs table with this run's runs
        assert "Model registry" in experiment and "Training runs" not in experiment, experiment
        # (the trainings are nested under the pipeline's run, folded until expanded)
        assert parent.info.run_name in experiment and "3 matching runs" in experiment, experiment
        # a link per registered model: its versions and aliases, in the model-training view
        assert [url.split("/#/models/")[1].split("?")[0] for url in models] == ["timemachine-rnn"]
        registry = text_of(browser(models[0]))
        assert "Model registry" in registry and re.search(r"@(&nbsp;|\s)champion", registry), registry
        # the link the Prefect artifact and the terminal give for a run; its artifacts load
        run_url = links["MLflow runs"].replace("?", f"/runs/{rnn.info.run_id}/artifacts?")
        run_page = text_of(browser(run_url))
        assert "perplexity.png" in run_page and "Model registry" in run_page, run_page
        version = client.get_model_version_by_alias("timemachine-rnn", "champion")
        assert f"/#/experiments/{rnn.info.experiment_id}/runs/{rnn.info.run_id}" \
               f"?workflowType=machine_learning" in version.description
        # the standard tags that fill the UI's Source and User columns
        assert rnn.data.tags["mlflow.source.name"] == "pipeline" and rnn.data.tags["mlflow.user"]

        assert "Flow runs" in text_of(browser(links["Prefect runs"]))
        # the flow run the MLflow run links to (the UI of `prefect server start`, port 4200 in
        # the links the pipeline writes), with its stages
        flow_run = parent.data.tags["prefect.flow_run_url"].replace(
            "127.0.0.1:4200", f"127.0.0.1:{prefect_port}")
        prefect = text_of(browser(flow_run))
        assert parent.info.run_name in prefect and "Completed" in prefect, prefect
    finally:
        ui.send_signal(signal.SIGINT)
        out, _ = ui.communicate(timeout=30)
    assert ui.returncode == 0 and "stopped the UI servers" in out, out


def test_dvc_plots_show_draws_every_chart_offline(ran, browser):
    root, env = ran
    _dvc(root, env, "plots", "show")
    dom = browser((root / "dvc_plots" / "index.html").as_uri())
    # vega-embed draws each chart as an SVG of its own (DVC asks for the svg renderer); the
    # comparison figure is an image
    drawn = re.findall(r'<svg[^>]*class="marks"[^>]*width="(\d+)"', dom)
    assert len(drawn) == 3 and all(int(width) > 100 for width in drawn), dom[-3000:]
    assert len(re.findall(r'<img[^>]*src="static/[^"]*comparison\.png"', dom)) == 1
    # the legends: the model trained, the baselines with their order; the k-step chart has
    # no smoothing slider
    texts = set(re.findall(r"<text[^>]*>([^<]+)</text>", dom))
    assert {"rnn", "kneser_ney_3gram", "unigram", "k (steps ahead)"} <= texts, texts
    assert 'type="range"' not in dom


def test_the_plots_page_is_the_one_tools_plots_page_writes():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import plots_page
    assert plots_page.PAGE.read_text() == plots_page.page(), \
        "run `python tools/plots_page.py` and commit .dvc/plots/page.html"
