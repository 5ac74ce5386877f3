"""Hyperparameter search with Keras Tuner over the trainer's own configs.

    kcp tune --run-dir runs/digits --set tune.algorithm=bayesian --set tune.max_trials=10

The search space (tuning.space) maps config keys to hyperparameters; each trial's config is
built and fitted by the trainer's entry (tuning.hypermodel); results go to RUN/tuning/: the
tuner's project folder (resumable), trials.csv, best_hparams.json, best_config.yaml and
trials.png (tuning.results). The final run on train + validation is the trainer's, on
`tuning.results.best_config(config, run_dir)`.

A distributed search shares the run directory: the chief (KERASTUNER_TUNER_ID=chief) serves
the oracle and writes the results, workers run trials and stop when the chief is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import keras

from kcp.core import storage
from kcp.core.config import Config
from kcp.core.layout import RunLayout
from tuning.hypermodel import TrainerHyperModel, make_tuner
from tuning.results import write_results
from tuning.space import search_space

log = logging.getLogger("kcp.tune")

CHIEF_GONE_SECONDS = 30


def watch_chief(host: str, port: int, grace_seconds: float = CHIEF_GONE_SECONDS, interval: float = 2.0) -> None:
    """Ends this worker process (exit 0) once the chief has been unreachable for `grace_seconds`.

    Keras Tuner's client waits for the chief with no deadline, so without this a worker whose
    chief died would hang forever. Its finished trials are already with the chief's oracle.
    """

    def watch():
        last_seen = time.monotonic()
        while True:
            try:
                socket.create_connection((host, port), timeout=interval).close()
                last_seen = time.monotonic()
            except OSError:
                if time.monotonic() - last_seen > grace_seconds:
                    log.warning("tune: the chief at %s:%d is gone; this worker stops", host, port)
                    logging.shutdown()
                    os._exit(0)  # noqa: SLF001  the search thread is blocked inside grpc
            time.sleep(interval)

    threading.Thread(target=watch, name="chief-watchdog", daemon=True).start()


def run_search(config: Config, run_dir: str) -> dict:
    """Runs (or resumes) the search; the chief of a distributed search only serves the oracle.
    Returns the results (write_results), or {"role": tuner id} on a worker."""
    space = search_space(config)
    directory = RunLayout(run_dir).tuning
    storage.makedirs(directory)
    keras.utils.set_random_seed(config.train.seed)
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "")
    worker = bool(tuner_id) and "chief" not in tuner_id
    if worker:
        watch_chief(os.environ["KERASTUNER_ORACLE_IP"], int(os.environ["KERASTUNER_ORACLE_PORT"]))
    tuner = make_tuner(config, TrainerHyperModel(config, run_dir, space), directory)
    tuner.search(epochs=config.train.epochs, verbose=0)
    if worker:  # a worker holds only a client of the chief's oracle: the chief writes the results
        return {"role": tuner_id}
    return write_results(tuner, config, run_dir, space)
