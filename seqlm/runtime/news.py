"""What a pipeline run tells the Prefect server, for the messages of `seqlm notify`
(automations.yaml): labels on its flow run, which a message about the run's end reads (the links
to the run in Prefect and MLflow, the stage that failed and its error, what changed in the data),
and an event for every champion decision of a training that ran (`seqlm.champion.moved`,
`seqlm.champion.rejected`).

The labels go on the run a deployment started (with `execution.task_runner: dask` the stages
run in a subflow of it), so a message about it finds them. Nothing here may fail a run: an API
error is a warning in the log.
"""
from __future__ import annotations

import logging
from typing import Any

from prefect import get_client
from prefect.context import FlowRunContext

log = logging.getLogger("seqlm.pipeline")
LABEL_CHARS = 1000               # a label value is a line of a message, not a log


class RunNews:
    """The labels and events of the current flow run (None outside one: nothing is told)."""

    def __init__(self) -> None:
        context = FlowRunContext.get()
        self.flow_run = context.flow_run if context is not None else None
        self.top = self.flow_run
        self.data_change: str | None = None
        if self.flow_run is not None and self.flow_run.parent_task_run_id is not None:
            self.top = self._best_effort(self._top_flow_run, "find the run's deployment run") \
                or self.flow_run

    def _top_flow_run(self, client: Any) -> Any:
        run = self.flow_run
        while run.parent_task_run_id is not None:
            run = client.read_flow_run(client.read_task_run(run.parent_task_run_id).flow_run_id)
        return run

    def _best_effort(self, act: Any, what: str) -> Any:
        try:
            with get_client(sync_client=True) as client:
                return act(client)
        except Exception as exc:  # noqa: BLE001 - the run goes on without it
            log.warning("could not %s on the Prefect server: %s", what,
                        " ".join(str(exc).split())[:200])
            return None

    def label(self, **labels: str) -> None:
        """Set labels `seqlm.<key>` on the run (one line each)."""
        if self.top is None:
            return
        values = {f"seqlm.{key}": " ".join(str(value).split())[:LABEL_CHARS]
                  for key, value in labels.items()}
        self._best_effort(lambda client: client.update_flow_run_labels(self.top.id, values),
                          "label the flow run")

    def failed(self, stage: str, exc: BaseException) -> None:
        """The stage (or stages) the run failed in, and the error in one line."""
        self.label(failed_stage=stage, error=f"{type(exc).__name__}: {exc}")

    def changed_data(self, summary: str) -> None:
        self.data_change = summary
        self.label(data_change=summary)

    def champion(self, decision: dict[str, Any]) -> None:
        """The event of one champion decision, with what changed in the data if it did; related
        to the run a deployment started (and its deployment), which the automations match."""
        if self.top is None:
            return
        from prefect.events import emit_event
        moved = decision["moved"]
        related = [{"prefect.resource.id": f"prefect.flow-run.{self.top.id}",
                    "prefect.resource.role": "flow-run", "prefect.resource.name": self.top.name}]
        if self.top.deployment_id is not None:
            related.append({"prefect.resource.id": f"prefect.deployment.{self.top.deployment_id}",
                            "prefect.resource.role": "deployment"})
        try:
            emit_event(
                event=f"seqlm.champion.{'moved' if moved else 'rejected'}",
                resource={"prefect.resource.id": f"mlflow.registered-model.{decision['name']}",
                          "prefect.resource.name": decision["name"],
                          "prefect.resource.role": "registered-model"},
                related=related, payload={**decision, "data_change": self.data_change})
        except Exception as exc:  # noqa: BLE001 - as every call here: never fail the run
            log.warning("could not emit the champion event of %s: %s", decision["name"], exc)
