"""A trained character language model as an MLflow pyfunc: weights + vocabulary in, text out.

    model = mlflow.pyfunc.load_model("models:/timemachine-rnn@champion")
    model.predict(pd.DataFrame({"prefix": ["time traveller"]}))   # -> ["time traveller ..."]

Optional columns: num_chars (default 50), temperature and top_k (sampling), seed.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

PACKAGE_DIR = Path(__file__).resolve().parent


class CharLanguageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from seqlm.generate import load_trained
        from seqlm.generate import clean_of
        self.model, self.vocab, meta = load_trained(Path(context.artifacts["model_dir"]),
                                                    device="cpu")
        self.clean = clean_of(meta)          # a prefix is read as the model's text was

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from seqlm.generate import predict
        rows = model_input.to_dict("records")
        return [predict(str(row["prefix"]), int(_get(row, "num_chars", 50)), self.model,
                        self.vocab, torch.device("cpu"),
                        temperature=_get(row, "temperature", None),
                        top_k=_get(row, "top_k", None), seed=_get(row, "seed", None),
                        clean=self.clean)
                for row in rows]


def _get(row: dict, key: str, default):
    value = row.get(key, default)
    return default if value is None or (isinstance(value, float) and pd.isna(value)) else value


# Only `prefix` is required; the generation settings are optional columns of the same row.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prefix"),
                   ColSpec("long", "num_chars", required=False),
                   ColSpec("double", "temperature", required=False),
                   ColSpec("long", "top_k", required=False),
                   ColSpec("long", "seed", required=False)]),
    outputs=Schema([ColSpec("string")]))


def log_char_lm(model_dir: Path, name: str) -> mlflow.models.model.ModelInfo:
    """Log model_dir (model.pt, vocab.parquet, meta.json) under the active run as `name`. The
    model is logged from code (seqlm/pyfunc_model.py), not pickled."""
    with warnings.catch_warnings():
        # The integer column of the input example draws a hint about missing values; the
        # signature above already declares num_chars, top_k and seed as optional.
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PACKAGE_DIR / "pyfunc_model.py"),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(PACKAGE_DIR)],  # ships seqlm: the model loads outside this repo too
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pandas", "pyarrow",
                              "numpy"],
            signature=SIGNATURE,
            input_example=pd.DataFrame({"prefix": ["time traveller"], "num_chars": [20]}),
        )
