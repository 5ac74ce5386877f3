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

import json
import logging
import os
import socket
import threading
import time

import keras

from kcp.core import quiet, storage
from kcp.core.cluster import is_tuner_worker, tuner_id
from kcp.core.config import Config
from kcp.core.errors import UserError
from kcp.core.layout import RunLayout
from tuning.hypermodel import TrainerHyperModel, make_tuner
from tuning.results import write_results
from tuning.space import search_space

log = logging.getLogger("kcp.tune")


def watch_chief(host: str, port: int, grace_seconds: float, interval: float = 2.0) -> None:
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
                    quiet.drain()  # the thread that forwards stderr passes the line on before the exit
                    os._exit(0)  # noqa: SLF001  the search thread is blocked inside grpc
            time.sleep(interval)

    threading.Thread(target=watch, name="chief-watchdog", daemon=True).start()


FINGERPRINT = "fingerprint.json"  # RUN/tuning/: what the search (and its oracle) was made for
RESUMABLE = ("max_trials", "retrain_best", "chief_timeout")  # tune keys a resumed search may change


def search_fingerprint(config: Config, run_dir: str, space: dict | None = None) -> dict:
    """What the tuner's oracle depends on: the data contract, the model and train sections (the
    fixed keys of every trial) and the search settings; `tune.max_trials` may grow on a resume.

    The keys of the search space are left out of the model and train sections: the search sets
    them in every trial, so their base values are not part of what it was made for. They change
    when `kcp train --config RUN/tuning/best_config.yaml` records the best values in
    RUN/config.yaml, and the same tune command run again must resume that search, not refuse it."""
    plain = config.to_dict()
    tuned = set(search_space(config) if space is None else space)
    fixed = {section: {key: value for key, value in plain[section].items() if f"{section}.{key}" not in tuned}
             for section in ("model", "train")}
    return {"contract_sha256": storage.sha256(RunLayout(run_dir).metadata), **fixed,
            "tune": {k: v for k, v in plain["tune"].items() if k not in RESUMABLE}}


def check_fingerprint(config: Config, run_dir: str, space: dict | None = None) -> None:
    """Records the search's fingerprint in a new RUN/tuning/, or refuses (one line) to resume a
    search that was made for another model, search space, training setup or data contract: its
    oracle's trials and best_hparams.json would describe something else. A fingerprint recorded
    with the tuned keys in it (before they were left out) is compared without them."""
    layout = RunLayout(run_dir)
    path = storage.join(layout.tuning, FINGERPRINT)
    space = search_space(config) if space is None else space
    text = json.dumps(search_fingerprint(config, run_dir, space), indent=2, sort_keys=True, default=str) + "\n"
    wanted = json.loads(text)
    if storage.exists(path):
        found = json.loads(storage.read_text(path))
        for key in space:
            section, _, name = key.partition(".")
            if isinstance(found.get(section), dict):
                found[section].pop(name, None)
        if found != wanted:
            changed = [("data contract" if key == "contract_sha256" else f"{key} section")
                       for key in ("contract_sha256", "model", "train", "tune") if found.get(key) != wanted[key]]
            raise UserError(f"{layout.tuning} holds a search made for another {' and '.join(changed)}; tune in a "
                            f"new run directory, or delete {layout.tuning} to start the search afresh")
        return
    storage.write_text_atomic(path, text)


def run_search(config: Config, run_dir: str) -> dict:
    """Runs (or resumes) the search; the chief of a distributed search only serves the oracle.
    Returns the results (write_results), or {"role": tuner id} on a worker."""
    space = search_space(config)
    directory = RunLayout(run_dir).tuning
    storage.makedirs(directory)
    keras.utils.set_random_seed(config.train.seed)
    worker = is_tuner_worker()
    if worker:
        watch_chief(os.environ["KERASTUNER_ORACLE_IP"], int(os.environ["KERASTUNER_ORACLE_PORT"]),
                    config.tune.chief_timeout)
    if not worker:
        check_fingerprint(config, run_dir, space)
    tuner = make_tuner(config, TrainerHyperModel(config, run_dir, space), directory)
    tuner.search(epochs=config.train.epochs, verbose=0)
    if worker:  # a worker holds only a client of the chief's oracle: the chief writes the results
        return {"role": tuner_id()}
    return write_results(tuner, config, run_dir, space)
