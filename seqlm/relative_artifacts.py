"""MLflow artifacts addressed relative to the store that records them, so that a clone can move.

For a local store MLflow writes absolute `file://` locations into `mlflow.db` (and into every
logged model): copy or rename the folder and each artifact and registered model is a broken
link. The pipeline's experiments therefore keep their artifacts at `seqlm-artifacts:/<path>`, a
scheme this module serves as an MLflow artifact-repository plugin (the entry point
`mlflow.artifact_repository` in pyproject.toml, so `mlflow ui`, `mlflow models serve` and
`mlflow.pyfunc.load_model` in this environment read it too): the folder `mlartifacts/<path>`
beside the sqlite file of the tracking store (for any other store, of the working directory).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

SCHEME = "seqlm-artifacts"
FOLDER = "mlartifacts"
# What `mlflow server` / `mlflow ui` exports as its backend store to its workers.
_SERVER_STORE_ENV = "_MLFLOW_SERVER_FILE_STORE"


def experiment_location(experiment: str) -> str:
    """The artifact location of a new experiment: one folder per experiment name."""
    return f"{SCHEME}:/{re.sub(r'[^A-Za-z0-9._-]+', '-', experiment).strip('.-') or 'experiment'}"


def store_folder(tracking_uri: str | None) -> Path:
    """The folder that holds `mlartifacts/`: the sqlite file's of the store, else the cwd."""
    import mlflow
    uri = tracking_uri or os.environ.get(_SERVER_STORE_ENV) or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve().parent
    return Path.cwd().resolve()


class RelativeArtifactRepository(LocalArtifactRepository):
    """`seqlm-artifacts:/a/b` is the local folder `<store folder>/mlartifacts/a/b`."""

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None,
                 registry_uri: str | None = None) -> None:
        root = store_folder(tracking_uri or registry_uri) / FOLDER
        folder = (root / urlparse(artifact_uri).path.lstrip("/")).resolve()
        if not folder.is_relative_to(root):
            raise ValueError(f"artifact location {artifact_uri!r} leaves {root}")
        super().__init__(folder.as_uri(), tracking_uri, registry_uri)
        # Locations derived from this one (a run's sub-folder) keep the relative scheme.
        self.artifact_uri = artifact_uri
