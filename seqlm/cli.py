"""`seqlm`: run the pipeline, one stage (what dvc.yaml calls), the schedule, or generate text."""
from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from seqlm.params import PARAMS_FILE, ParamsError, load_params

# Registered at import, before the exit handlers of what the commands start (the temporary
# server's stop, MLflow's and Prefect's), so it runs after them: the objects left are then out of
# the collector's reach and the interpreter's final collections no longer walk torch's, MLflow's
# and Prefect's heaps (seconds of a re-run with nothing changed: bench/). Streams and files are
# still flushed and closed at exit; the memory goes back to the system with the process.
atexit.register(gc.freeze)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sequence models of D2L chapter 8 as a Prefect + DVC + MLflow pipeline.")

@app.callback()
def _project_settings() -> None:
    # prefect.toml turns Prefect's analytics off; its client reads only DO_NOT_TRACK, when
    # Prefect is imported (after this, by the command), and no settings file sets it. Without
    # it the first run of a clone in a terminal opens with Prefect's telemetry notice.
    os.environ.setdefault("DO_NOT_TRACK", "1")


ParamsOption = Annotated[Path, typer.Option(
    "--params", help="params file (another file than params.yaml runs an experiment that does "
                     "not update dvc.lock)")]


def _fail(message: str) -> None:
    """End with `error: message`: one line, or on a terminal one message wrapped at its spaces
    to the terminal's width (never inside a path or a URL, never cut)."""
    text = f"error: {message}"
    if sys.stderr.isatty():
        import shutil
        import textwrap
        text = textwrap.fill(text, width=shutil.get_terminal_size().columns,
                             subsequent_indent="  ", break_long_words=False,
                             break_on_hyphens=False)
    typer.secho(text, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


STOPPED_RUN = ("interrupted: the run stopped; finished stages and the last checkpoints are "
               "kept, and the next run resumes")


@contextlib.contextmanager
def _one_line_errors(interrupted: str = STOPPED_RUN) -> Iterator[None]:
    """A failing stage ends the command with its own one-line message, not a traceback (the
    Prefect run logs keep the traceback). SEQLM_TRACEBACK=1 lets the exception through.
    Ctrl-C / SIGTERM end it with one line and the shell's exit code for the signal."""
    from seqlm import interrupt
    try:
        with interrupt.stop_on_signals():
            yield
    except (KeyboardInterrupt, interrupt.Interrupted):
        typer.secho(interrupted, fg=typer.colors.RED, err=True)
        raise typer.Exit(interrupt.exit_code()) from None
    except Exception as exc:  # noqa: BLE001 - every stage error is reported the same way
        if os.environ.get("SEQLM_TRACEBACK"):
            raise
        _fail(f"{type(exc).__name__}: {' '.join(str(exc).split())}")


def _params(path: Path):
    try:
        return load_params(path)
    except ParamsError as exc:
        _fail(str(exc))


@app.command()
def run(params: ParamsOption = PARAMS_FILE,
        dvc: Annotated[bool, typer.Option(
            help="at the end, update dvc.lock and push the artifacts to the DVC remote")] = True,
        debug: Annotated[bool, typer.Option(
            help="show Prefect's failure lines and the tracebacks in the terminal too, and end "
                 "with the exception's traceback")] = False,
        ) -> None:
    """Run the whole pipeline as a Prefect flow; unchanged stages are skipped."""
    if debug:
        os.environ["SEQLM_TRACEBACK"] = "1"
    loaded = _params(params)  # a bad params.yaml fails here, before any server starts
    from seqlm.runtime.workspace import workspace_lock
    with _one_line_errors(), workspace_lock("seqlm run", dvc=dvc):   # refused at once if busy
        from seqlm.runtime import server
        # The server takes seconds to come up: started first (before Prefect is imported, which
        # reads its URL once), it boots on the other core while this process checks the machine
        # and the MLflow store (the flow checks them again, for the runs a worker starts),
        # imports the flow and opens the MLflow store.
        server.start_temporary_server(wait=False)
        from seqlm.runtime.preflight import check_machine
        check_machine(loaded)
        from seqlm.tracking import check_store, open_store
        check_store()                       # an unusable MLflow store fails in seconds
        from flows.pipeline import pipeline
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
        _tidy_terminal(debug)
        open_store()
        server.wait_for_server()
        # Heartbeats let a lasting server mark a flow run whose process died as crashed. A
        # temporary server dies with this process (the next run closes a killed one, see
        # seqlm.runtime.workspace), and the heartbeat thread, which sleeps in 1 s steps, held up
        # every run's end.
        heartbeats = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None} if server.started_pid else {}
        with temporary_settings(updates=heartbeats):
            states = pipeline(params_file=str(params), record_dvc=dvc)
    for stage, state in states.items():
        typer.echo(f"{stage:24s} {state}")


# What Prefect's engine says of a failure, each a second (or third) telling of the error that
# `seqlm run` ends with in one line; they stay in the Prefect run logs.
_ENGINE_ON_FAILURE = {"prefect.task_runs": ("Finished in state", "Task run failed with exception"),
                      "prefect.flow_runs": ("Encountered exception during execution",
                                            "Finished in state Failed")}


def _tidy_terminal(debug: bool) -> None:
    """Each stage's outcome is said once in the terminal, by the table `seqlm run` prints at the
    end, and each error once, by its `error:` line; Prefect's "Finished in state" line of every
    task run, its failure lines and every traceback stay in the run's logs (the API handler,
    which handles a record before it propagates to the root logger's console). --debug shows
    them here too. And the log lines go between the trainings' progress bars."""
    from prefect.logging.handlers import PrefectConsoleHandler

    def said_elsewhere(record: logging.LogRecord) -> bool:
        if debug:
            return True
        if record.getMessage().startswith(_ENGINE_ON_FAILURE.get(record.name, ())):
            return False
        record.exc_info = record.exc_text = None      # the root console is the last handler
        return True
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(said_elsewhere)
            _logs_between_bars(handler)


def _logs_between_bars(handler: logging.StreamHandler) -> None:
    """`handler` clears the live progress bars before a line and redraws them after it (tqdm's
    external_write_mode): written at the cursor, a line began at the end of a bar's line."""
    from tqdm import tqdm
    emit = handler.emit

    def emit_between_bars(record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=handler.stream):
            emit(record)
    handler.emit = emit_between_bars


@app.command()
def stage(name: Annotated[str, typer.Argument(
              help="download, preprocess, ngrams, sine, train_ar, train_lm or evaluate")],
          item: Annotated[Optional[str], typer.Argument(
              help="for train_lm: the model (rnn_scratch, rnn, gru or lstm)")] = None,
          params: ParamsOption = PARAMS_FILE) -> None:
    """Run one stage (the command each dvc.yaml stage runs)."""
    from seqlm.stages import STAGE_BY_NAME
    if name not in STAGE_BY_NAME:
        _fail(f"unknown stage {name!r}: expected one of {', '.join(STAGE_BY_NAME)}")
    graph_stage = STAGE_BY_NAME[name]
    if item is not None and not graph_stage.foreach:
        _fail(f"stage {name} takes no item, got {item!r}")
    if item is None and graph_stage.foreach:
        _fail(f"stage {name} needs an item: one of {graph_stage.foreach}")
    loaded = _params(params)
    import uuid

    from seqlm import tracking
    from seqlm.runtime.records import run_alone
    from seqlm.runtime.workspace import run_record, workspace_lock
    from tasks import task_of
    with _one_line_errors(), workspace_lock(f"seqlm stage {name}"), \
            run_record(logging.getLogger("seqlm.stage")) as record:
        # the id its MLflow runs carry: a killed stage's are closed by the next run
        tracking.stage_run = uuid.uuid4().hex
        record.set(stage_run=tracking.stage_run, mlflow_uri=tracking.tracking_uri())
        run_alone(task_of(name, loaded), loaded, item)
    for path in graph_stage.at(loaded, item).written():
        typer.echo(path)


@app.command("dvc-yaml")
def dvc_yaml(check: Annotated[bool, typer.Option(help="only check dvc.yaml is current")] = False) -> None:
    """Write dvc.yaml from the stage graph in seqlm/stages.py."""
    from seqlm.stages import render_dvc_yaml
    text = render_dvc_yaml()
    path = Path("dvc.yaml")
    if check:
        if not path.exists() or path.read_text() != text:
            _fail("dvc.yaml is out of date with seqlm/stages.py: run `seqlm dvc-yaml`")
        typer.echo("dvc.yaml is up to date")
        return
    path.write_text(text)
    typer.echo(f"wrote {path}")


@app.command("params-doc")
def params_doc(check: Annotated[bool, typer.Option(
        help="only check docs/parameters.md is current")] = False) -> None:
    """Write docs/parameters.md from the schema in seqlm/params.py."""
    from seqlm.params_doc import DOC_FILE, UndocumentedField, render, write
    try:
        if check:
            if not DOC_FILE.exists() or DOC_FILE.read_text(encoding="utf-8") != render():
                _fail(f"{DOC_FILE} is out of date with seqlm/params.py: run `seqlm params-doc`")
            typer.echo(f"{DOC_FILE} is up to date")
            return
        typer.echo(f"wrote {write()}")
    except (UndocumentedField, ParamsError) as exc:
        _fail(str(exc))


@app.command()
def schedule(cron: Annotated[str, typer.Option(help="cron schedule (UTC)")] = "0 3 * * *",
             port: Annotated[int, typer.Option(help="port of the Prefect server on 127.0.0.1 "
                                                    "(and its UI)")] = 4200,
             params: ParamsOption = PARAMS_FILE) -> None:
    """Start a Prefect server on 127.0.0.1 (unless one answers there) and serve the pipeline on
    a cron schedule, one run at a time (a run due meanwhile waits). Ctrl-C stops both; the
    schedule stays active for the next start. `seqlm notify` sends messages about its runs."""
    _params(params)
    from seqlm import interrupt
    from seqlm.runtime import server
    api_url = f"http://127.0.0.1:{port}/api"
    with _one_line_errors():
        process = server.start_lasting_server(port)
    try:
        os.environ["PREFECT_API_URL"] = api_url
        typer.echo(f"Prefect UI: http://127.0.0.1:{port}  schedule: {cron} (Ctrl-C stops)")
        from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

        from flows.pipeline import pipeline
        with interrupt.stop_on_signals():
            # Prefect's serve ends on Ctrl-C by itself (or raises it, when it comes mid-step).
            # One run at a time, as the deployment of prefect.yaml: a run due while another runs
            # waits for it (AwaitingConcurrencySlot), never fails.
            with contextlib.suppress(KeyboardInterrupt):
                pipeline.serve(name="scheduled", cron=cron,
                               parameters={"params_file": str(params)}, pause_on_shutdown=False,
                               print_starting_message=False,
                               global_limit=ConcurrencyLimitConfig(
                                   limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE))
    finally:
        if process is not None:
            server.stop(process)
    typer.echo("stopped serving; the schedule stays active for the next start")


@app.command()
def notify(url: Annotated[Optional[str], typer.Option(
               help="where the messages go: an Apprise URL (mailto://, slack://, ntfy://, "
                    "tgram://, ...) or an http(s):// webhook that receives a POST of JSON "
                    "{subject, body}")] = None,
           remove: Annotated[bool, typer.Option(
               "--remove", help="delete the automations and the notification block")] = False,
           port: Annotated[int, typer.Option(
               help="port on 127.0.0.1 of this clone's Prefect server (`seqlm schedule`'s), "
                    "used when PREFECT_API_URL is unset")] = 4200,
           automations: Annotated[Path, typer.Option(
               help="the automations to apply")] = Path("automations.yaml")) -> None:
    """Send a message when a scheduled pipeline run fails, crashes or times out, and when a
    champion moves: the notification block and the automations of automations.yaml, made (or
    updated) on the Prefect server of PREFECT_API_URL, else on this clone's (started for the
    command if it is not running)."""
    if (url is None) == (not remove):
        _fail("give --url URL (where messages go) or --remove")
    from seqlm.runtime import server
    own = f"http://127.0.0.1:{port}/api"
    api_url = os.environ.get("PREFECT_API_URL") or own
    os.environ["PREFECT_API_URL"] = api_url       # before Prefect is imported: it reads it once
    process = None
    with _one_line_errors():
        from seqlm import notify as notifications
        planned = notifications.plan(url, automations) if url else None   # checked first
        if api_url == own:
            process = server.start_lasting_server(port)       # None: one answers there already
        elif not server.healthy(api_url):
            raise server.ServerError(f"PREFECT_API_URL = {api_url!r}: no Prefect server answers")
    try:
        with _one_line_errors():
            if planned is None:
                gone = notifications.remove()
                typer.echo(f"removed from {api_url}: {', '.join(gone) or 'nothing was there'}")
                return
            stale = notifications.apply(planned)
        typer.echo(f"notifications on {api_url}: block {notifications.BLOCK_NAME}, "
                   f"{planned.sends_to}")
        for automation in planned.automations:
            typer.echo(f"  automation {automation.name}: "
                       f"{'on' if automation.enabled else 'off'} ({automation.description})")
        for name in stale:
            typer.echo(f"  automation {name}: deleted (no longer in {automations})")
        if process is not None:
            typer.echo("They act while this clone's Prefect server runs (`seqlm schedule`).")
    finally:
        if process is not None:
            server.stop(process)


@app.command()
def ui(mlflow_port: Annotated[int, typer.Option(help="port of the MLflow UI on 127.0.0.1 (the "
                                                   "links the pipeline writes say 5000)")] = 5000,
       prefect_port: Annotated[int, typer.Option(help="port of the Prefect UI on 127.0.0.1 (the "
                                                    "links the pipeline writes say 4200)")] = 4200,
       params: ParamsOption = PARAMS_FILE) -> None:
    """Start the MLflow UI and the Prefect UI on this clone's stores (each unless a server
    answers on its port already) and print their links. Ctrl-C stops both."""
    settings = _params(params)
    from seqlm import interrupt, tracking
    from seqlm.runtime import server
    store = tracking.tracking_uri()
    started = []
    try:
        with _one_line_errors():
            if not store.startswith(("http://", "https://")):
                started.append(server.start_mlflow_ui(store, mlflow_port))
                tracking.UI_PORT = mlflow_port
            started.append(server.start_lasting_server(prefect_port))
            from mlflow import MlflowClient
            client = MlflowClient(store)
            experiment = client.get_experiment_by_name(settings.tracking.experiment)
            models = sorted(model.name for model in client.search_registered_models())
        route = f"experiments/{experiment.experiment_id}" if experiment else "experiments"
        typer.echo(f"MLflow runs:     {tracking.ui_url(store, route)}")
        # Each registered model's page: MLflow 3.17's list of them drops the link's view and
        # opens in its GenAI view in a new browser.
        for name in models:
            typer.echo(f"MLflow model:    {tracking.ui_url(store, f'models/{name}')}")
        if not models:
            typer.echo("MLflow model:    none registered yet (`seqlm run` registers them)")
        typer.echo(f"Prefect runs:    http://127.0.0.1:{prefect_port}/runs")
        typer.echo("Ctrl-C stops " + ("them" if any(started) else "nothing: both were running"))
        with interrupt.stop_on_signals(), contextlib.suppress(KeyboardInterrupt,
                                                               interrupt.Interrupted):
            while all(process is None or process.poll() is None for process in started):
                time.sleep(0.5)
            _fail("a UI server stopped; its output is in .seqlm/")
    finally:
        for process in filter(None, started):
            server.stop(process)
    typer.echo("stopped the UI servers this command started")


@app.command()
def generate(prefix: Annotated[str, typer.Argument(
                 help="text to continue; normalised as the corpus is (lower case, other "
                      "characters become one space)")] = "time traveller",
             model: Annotated[str, typer.Option(help="model folder name under models/, or an "
                                                     "MLflow URI like models:/timemachine-rnn@champion")] = "rnn",
             num_chars: Annotated[int, typer.Option(min=0, help="characters to generate")] = 50,
             temperature: Annotated[Optional[float], typer.Option(
                 help="sample from softmax(logits / T), T > 0, instead of the greedy "
                      "argmax")] = None,
             top_k: Annotated[Optional[int], typer.Option(
                 min=1, help="sample among the k most likely characters only")] = None,
             seed: Annotated[Optional[int], typer.Option(
                 help="seed of the sampling (the same seed, the same text)")] = None) -> None:
    """Continue PREFIX with a trained model (greedy unless --temperature/--top-k); the text is
    written as it is generated."""
    from seqlm.generate import MAX_CHARS
    if num_chars > MAX_CHARS:
        _fail(f"--num-chars = {num_chars}: at most {MAX_CHARS:,} characters a call")
    with _one_line_errors(interrupted="\ninterrupted: generation stopped"):
        for piece in _generate(prefix, model, num_chars, temperature, top_k, seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def _generate(prefix: str, model: str, num_chars: int, temperature: float | None,
              top_k: int | None, seed: int | None) -> Iterator[str]:
    """The text in pieces: from a models/ folder a character at a time, from an MLflow model
    (whose predict returns whole texts) at once."""
    import torch
    if model.startswith(("models:/", "runs:/")):
        import mlflow
        import pandas as pd
        from seqlm.tracking import fluent_store, tracking_uri
        with fluent_store(tracking_uri()):
            loaded = mlflow.pyfunc.load_model(model)
        settings = {"num_chars": num_chars, "temperature": temperature, "top_k": top_k,
                    "seed": seed}
        # Unset settings are left out: the model's signature makes them optional columns.
        row = {"prefix": prefix, **{k: v for k, v in settings.items() if v is not None}}
        return iter([loaded.predict(pd.DataFrame([row]))[0]])
    from seqlm.generate import clean_of, generate, load_trained
    model_dir = Path("models") / model
    if not (model_dir / "model.pt").exists():
        raise FileNotFoundError(f"{model_dir}/model.pt not found: train it first (seqlm run) or "
                                "pass an MLflow URI")
    net, vocab, meta = load_trained(model_dir, device="cpu")
    return generate(prefix, num_chars, net, vocab, torch.device("cpu"), temperature=temperature,
                    top_k=top_k, seed=seed, clean=clean_of(meta))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
