"""The README's pictures, taken from a real run of the main job: the MLflow training run and the
registered model, the Prefect flow run with its DAG, and the page `dvc plots show` writes.

    .venv/bin/python tools/screenshots.py                  # a fresh clone of HEAD, `seqlm run` in it
    .venv/bin/python tools/screenshots.py --workspace DIR  # a clone where `seqlm run` has run

Without --workspace it clones this repository's HEAD into a temporary folder and runs the main job
there (`seqlm run` on the defaults: about 3 minutes on 2 cores); this checkout is left as it is.
Then it starts `seqlm ui` on free ports and takes each page with headless Chromium (Debian's
`chromium`), driven over its DevTools protocol, with a fresh profile and no network but
127.0.0.1, as tests/test_browse.py does. The PNGs go to docs/images/. Run it again when a UI
changes.
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "images"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, VIEWPORT_HEIGHT = 1280, 860
SETTLE_S = 3         # for the last charts and the graph to draw after the page is ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path,
                        help="a clone where `seqlm run` has run (default: a fresh clone, run now)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the PNGs go")
    args = parser.parse_args()
    if CHROMIUM is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)         # the clone's own stores, as a user's first run has them
    with tempfile.TemporaryDirectory(prefix="seqlm-screenshots-") as tmp:
        workspace = args.workspace
        if workspace is None:
            workspace = Path(tmp) / "seqlm"
            subprocess.run(["git", "clone", "-q", str(REPO), str(workspace)], check=True)
            print(f"running the main job in a fresh clone of HEAD ({workspace}) ...", flush=True)
            run = subprocess.run([sys.executable, "-m", "seqlm.cli", "run"], cwd=workspace,
                                 env=env, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
            print(run.stdout)
            if run.returncode != 0:
                raise SystemExit(f"seqlm run failed ({run.returncode})")
        args.out.mkdir(parents=True, exist_ok=True)
        take_pictures(workspace.resolve(), env, args.out, Path(tmp) / "profile")


def take_pictures(workspace: Path, env: dict[str, str], out: Path, profile: Path) -> None:
    from mlflow import MlflowClient

    subprocess.run(["dvc", "plots", "show"], cwd=workspace, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    mlflow_port, prefect_port = free_port(), free_port()
    ui = subprocess.Popen([sys.executable, "-m", "seqlm.cli", "ui", "--mlflow-port",
                           str(mlflow_port), "--prefect-port", str(prefect_port)],
                          cwd=workspace, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        printed = ""
        while "Ctrl-C" not in printed:
            line = ui.stdout.readline()
            if not line:
                raise SystemExit(f"seqlm ui stopped:\n{printed}")
            printed += line
        print(printed, end="")
        runs_link = re.search(r"^MLflow runs: +(\S+)$", printed, re.M)[1]
        model_link = re.search(r"^MLflow model: +(\S+/models/[^/?]+-rnn\?\S*)$", printed, re.M)[1]

        client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("seqlm")
        runs = client.search_runs([experiment.experiment_id],
                                  order_by=["attributes.start_time DESC"])
        parent = next(r for r in runs if r.data.tags.get("seqlm.run") == "pipeline")
        rnn = next(r for r in runs if r.info.run_name == "rnn"
                   and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
        # The pipeline writes the links of a lasting server on 4200; `seqlm ui` serves this
        # clone's Prefect home on the port it was given.
        flow_run = parent.data.tags["prefect.flow_run_url"].replace(
            "127.0.0.1:4200", f"127.0.0.1:{prefect_port}")

        with Chromium(profile) as browser:
            browser.shot((workspace / "dvc_plots" / "index.html").as_uri(), out / "dvc-plots.png",
                         ready="document.querySelectorAll('svg.marks').length >= 3",
                         height=None)
            # MLflow opens its assistant beside every page in a browser that never closed it
            # (its own localStorage keys): closed, as after a person's first visit.
            browser.before_load(
                "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
            # The training run's charts of perplexity per epoch, as its search box filters them:
            # typed once every chart has drawn, taken once the two left have drawn again.
            plots = ("Array.from(document.querySelectorAll('.js-plotly-plot'))"
                     ".filter(plot => plot.getBoundingClientRect().width > 0)")
            drawn = f"{plots}.filter(plot => plot.querySelector('path.js-line')).length"
            browser.shot(runs_link.replace("?", f"/runs/{rnn.info.run_id}/model-metrics?"),
                         out / "mlflow-run.png", height=630,
                         ready=f"!!document.querySelector('{SEARCH_BOX}') && {drawn} > 2",
                         then=SEARCH_CHARTS % "_perplexity",
                         drawn=f"{plots}.length == 2 && {drawn} == 2")
            browser.shot(model_link, out / "mlflow-model.png", height=560,
                         ready="document.body.innerText.includes('champion')")
            # The flow run's header and its graph (drawn in WebGL by SwiftShader).
            browser.shot(flow_run, out / "prefect-flow-run.png", height=500,
                         ready=f"document.body.innerText.includes({parent.info.run_name!r})")
    finally:
        ui.send_signal(signal.SIGINT)
        ui.communicate(timeout=60)
    for png in sorted(out.glob("*.png")):
        print(f"{png.relative_to(REPO) if png.is_relative_to(REPO) else png}: "
              f"{png.stat().st_size // 1024} KiB")


SEARCH_BOX = 'input[placeholder="Search metric charts"]'
# Types into a React-controlled search box: its value setter, then the event React listens to.
SEARCH_CHARTS = f"""
const box = document.querySelector('{SEARCH_BOX}');
Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(box, %r);
box.dispatchEvent(new Event('input', {{bubbles: true}}));
"""


class Chromium:
    """Headless Chromium driven over the DevTools protocol: a fresh profile, no network but
    127.0.0.1, WebGL drawn by SwiftShader (Prefect's graph) without a GPU."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.ids = itertools.count(1)

    def __enter__(self) -> "Chromium":
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={self.profile}",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.process.stderr:
            if found := re.search(r"DevTools listening on ws://([^/]+)/", line):
                break
        else:
            raise SystemExit("chromium did not start its DevTools endpoint")
        with urllib.request.urlopen(f"http://{found[1]}/json/list", timeout=30) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.call("Page.enable")
        return self

    def __exit__(self, *exc: object) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)

    def call(self, method: str, **params: object) -> dict:
        number = next(self.ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:                                    # events in between are not needed
            message = json.loads(self.socket.recv(timeout=120))
            if message.get("id") == number:
                if "error" in message:
                    raise SystemExit(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def wait(self, url: str, condition: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not self.evaluate(f"(() => {{ try {{ return {condition}; }} catch {{ return false; }} }})()"):
            if time.monotonic() > deadline:
                raise SystemExit(f"{url}: not ready after {seconds:.0f} s ({condition})")
            time.sleep(0.5)

    def before_load(self, script: str) -> None:
        self.call("Page.addScriptToEvaluateOnNewDocument", source=script)

    def shot(self, url: str, path: Path, ready: str, height: int | None = None,
             then: str | None = None, drawn: str = "true") -> None:
        """`url` once `ready` holds (and after it `then` ran and `drawn` holds), the top `height`
        pixels of it (None: the whole page) in a window of WIDTH x VIEWPORT_HEIGHT, written as
        a PNG to `path`."""
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=VIEWPORT_HEIGHT,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        self.wait(url, ready)
        if then:
            self.evaluate(then)
            self.wait(url, drawn)
        time.sleep(SETTLE_S)
        if height is None:
            height = int(self.evaluate("document.documentElement.scrollHeight"))
        # Beyond the window only where the page is longer: that resizes the page's viewport,
        # and charts that follow their size (MLflow's) draw again, showing spinners meanwhile.
        data = self.call("Page.captureScreenshot", format="png",
                         captureBeyondViewport=height > VIEWPORT_HEIGHT,
                         clip={"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1})
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"took {path.name} from {url}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
