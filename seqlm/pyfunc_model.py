"""What MLflow runs to load a registered language model (a model from code: no pickle)."""
from mlflow.models import set_model

from seqlm.mlflow_model import CharLanguageModel

set_model(CharLanguageModel())
