"""The typed results of the Python API's stages (kcp/api.py): what `train`, `tune` and `report` return."""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field

from kcp.core import storage


@dataclass(frozen=True)
class TrainResult:
    metrics: dict  # RUN/train/metrics.json: per-split metrics, throughput, parameters
    history: dict  # RUN/train/history.json: per-epoch values
    model_path: str  # the chief's RUN/train/model.keras
    train_dir: str = ""  # where this process wrote: RUN/train, or RUN/train/worker-N for a non-chief worker

    @property
    def test_accuracy(self) -> float:
        return self.metrics.get("test", {}).get("accuracy", float("nan"))

    def load_model(self, compile: bool = True):  # noqa: A002  keras.saving.load_model's own name
        """The trained Keras model, read from `model_path` with kcp's layers registered (a fresh
        process's `keras.saving.load_model` does not know the transformer's, the rnn's or gpt's)."""
        import keras

        from trainer.models import register_custom_layers

        register_custom_layers()
        return keras.saving.load_model(self.model_path, compile=compile)

    def __repr__(self) -> str:  # metrics and history in full are the attributes' to show
        figures = [f"test_accuracy={self.test_accuracy:.4f}"] if not math.isnan(self.test_accuracy) else []
        figures += [f"{key}={self.metrics[key]}" for key in ("model", "epochs") if key in self.metrics]
        return f"TrainResult({', '.join(figures + [f'model_path={self.model_path!r}'])})"


@dataclass(frozen=True)
class TuneResult:
    summary: dict  # best trial, score, hyperparameters (best_hparams.json)
    retrained: TrainResult | None = None
    export_dir: str | None = None


@dataclass(frozen=True)
class Report:
    """RUN/report/: `path` is index.html; in Jupyter the figures show inline."""

    path: str
    figures: list = field(default_factory=list)

    def _repr_html_(self) -> str:
        images = [f'<img src="data:image/png;base64,{base64.b64encode(storage.read_bytes(path)).decode()}" '
                  f'alt="{html.escape(os.path.basename(path))}" style="max-width:100%">' for path in self.figures]
        return f"<p>{html.escape(self.path)}</p>" + "".join(images)
