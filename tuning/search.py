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

import grpc
import keras

from kcp.core import contract as contract_lib
from kcp.core import quiet, storage
from kcp.core.cluster import is_tuner_worker, tuner_id
from kcp.core.config import Config, ConfigError
from kcp.core.errors import UserError
from kcp.core.layout import RunLayout
from tuning.hypermodel import ObjectiveNotLogged, TrainerHyperModel, make_tuner
from tuning.results import clear_results, write_results
from tuning.space import search_space
from tuning.workers import exit_chief_when_every_trial_ended, pace_idle, watch_workers

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
RESUMABLE = ("max_trials", "retrain_best", "chief_timeout", "worker_timeout")  # tune keys a resumed search may change


def search_fingerprint(config: Config, run_dir: str, space: dict | None = None) -> dict:
    """What the tuner's oracle depends on: the data contract, the model and train sections (the
    fixed keys of every trial) and the search settings; `tune.max_trials` may grow on a resume.

    The keys of the search space are left out of the model and train sections: the search sets
    them in every trial, so their base values are not part of what it was made for. They change
    when `kcp train --config RUN/tuning/best_config.yaml` records the best values in
    RUN/config.yaml, and the same tune command run again must resume that search, not refuse it."""
    plain = config.to_dict()
    # trials always fit on train alone: include_validation (true once the best config is retrained) is not the search's
    tuned = {*(search_space(config) if space is None else space), "train.include_validation"}
    fixed = {section: without(plain[section], section, tuned) for section in ("model", "train")}
    return {"contract_sha256": storage.sha256(RunLayout(run_dir).metadata), **fixed,
            "tune": {k: v for k, v in plain["tune"].items() if k not in RESUMABLE}}


# how long a worker waits for its chief to come up (at least tune.chief_timeout): a launcher may start the
# chief's and the workers' pools minutes apart (Keras Tuner's client alone waits for ever)
CHIEF_START_SECONDS = 600


def oracle_address() -> tuple[str, int]:
    """(host, port) of the chief's oracle from KERASTUNER_ORACLE_IP/PORT (which --oracle sets, or a
    launcher); an IPv6 host without its brackets, as sockets take it. A port that is not a number: one line."""
    host, port = os.environ.get("KERASTUNER_ORACLE_IP", ""), os.environ.get("KERASTUNER_ORACLE_PORT", "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"KERASTUNER_ORACLE_PORT: {port!r} is not a port number (1 to 65535)")
    return host.strip("[]"), int(port)


def wait_for_chief(chief_timeout: float, interval: float = 1.0) -> None:
    """Returns once the chief's oracle answers; a chief never reached in max(tune.chief_timeout,
    CHIEF_START_SECONDS) is a mistyped --oracle or a chief never started: one line, exit 2 (a
    chief that was reached and is gone later ends the worker with 0, `watch_chief`)."""
    host, port = oracle_address()
    seconds = max(chief_timeout, CHIEF_START_SECONDS)
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=interval).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise UserError(f"--oracle: could not reach the chief at {host}:{port} in {seconds:g} s ({error}); "
                                f"start `kcp tune --role chief --oracle {host}:{port}` first, or check the address"
                                ) from None
        time.sleep(interval)


def check_oracle_port(host: str, port: int) -> None:
    """A chief refuses, before it records anything, an --oracle address it cannot serve on. The probe
    binds as gRPC does (SO_REUSEADDR): a chief restarted on its port while its old connections are in
    TIME_WAIT can serve there, and is not refused."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise UserError(f"--oracle: the chief cannot serve on {host}:{port} ({error.strerror or error}); "
                        "is another chief running there? choose another port") from None


def fingerprint_differences(found: dict, wanted: dict) -> list[str]:
    """The keys (section.key) in which `wanted` differs from the recorded fingerprint `found`."""
    differences = ["the data contract"] if found.get("contract_sha256") != wanted.get("contract_sha256") else []
    for section in ("model", "train", "tune"):
        ours, theirs = wanted.get(section) or {}, found.get(section) or {}
        differences += [f"{section}.{key} {json.dumps(ours.get(key))} (the search's: {json.dumps(theirs.get(key))})"
                        for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    return differences


def check_worker_config(config: Config, run_dir: str, space: dict) -> None:
    """A worker refuses (one line) to train trials with a config other than the chief's: its scores
    would be recorded under the chief's best_config.yaml. The chief wrote the search's fingerprint
    before its oracle served, in the run directory the two share."""
    path = storage.join(RunLayout(run_dir).tuning, FINGERPRINT)
    if not storage.exists(path):
        raise UserError(f"{path}: not found; a worker shares the chief's run directory (gs://... across machines)")
    wanted = json.loads(json.dumps(search_fingerprint(config, run_dir, space), sort_keys=True, default=str))
    differences = fingerprint_differences(recorded_fingerprint(path, space), wanted)
    if differences:
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise UserError(f"tune: this worker's config differs from the search its chief serves ({path}): "
                        f"{'; '.join(differences[:3])}{more}; start the worker with the chief's --config and --set, "
                        "or with none (it then reads the chief's RUN/config.yaml)")


def without(values: dict, section: str, keys) -> dict:
    """`values` (a config section) less the dotted `keys` of that section, nested ones
    (model.augment.zoom) included."""
    values = dict(values)
    for key in keys:
        head, _, path = key.partition(".")
        name, _, rest = path.partition(".")
        if head != section:
            continue
        if not rest:
            values.pop(name, None)
        elif isinstance(values.get(name), dict):
            values[name] = without(values[name], name, [path])
    return values


def recorded_fingerprint(path: str, space: dict) -> dict:
    """RUN/tuning/fingerprint.json as `search_fingerprint` makes it now: one recorded before the
    tuned keys and include_validation were left out is read without them."""
    found = json.loads(storage.read_text(path))
    for section in ("model", "train"):
        if isinstance(found.get(section), dict):
            found[section] = without(found[section], section, [*space, "train.include_validation"])
    return found


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
        found = recorded_fingerprint(path, space)
        if found != wanted:
            changed = [("data contract" if key == "contract_sha256" else f"{key} section")
                       for key in ("contract_sha256", "model", "train", "tune") if found.get(key) != wanted[key]]
            raise UserError(f"{layout.tuning} holds a search made for another {' and '.join(changed)}; tune in a "
                            f"new run directory, or delete {layout.tuning} to start the search afresh")
        return
    storage.write_text_atomic(path, text)


def check_objective(config: Config, run_dir: str) -> None:
    """Refuses, before the first trial, a `val_` objective on a contract without validation
    examples: every trial is scored on the validation split (the trainer, for train.monitor,
    falls back to the training metric; a search must not rank trials on their training fit)."""
    objective = config.tune.objective
    if not objective.startswith("val_"):
        return
    splits = contract_lib.read_contract(run_dir).splits
    if "validation" not in splits or not splits["validation"].count:
        raise ConfigError(f"tune.objective: {objective!r} is measured on the validation split, and there is no "
                          f"validation split ({RunLayout(run_dir).data} holds 0 validation examples; see data.split): "
                          f"preprocess again with one, or tune on a training metric (tune.objective={objective[4:]})")


def trial_states(tuner) -> dict:
    """{trial id: status} of the trials the tuner's oracle holds."""
    return {trial_id: trial.status for trial_id, trial in tuner.oracle.trials.items()}


def failure(trials) -> str:
    """The last line of the first failed trial's message (its exception), or ''."""
    for trial in sorted(trials, key=lambda t: t.trial_id):
        lines = [line for line in (trial.message or "").splitlines() if line.strip()]
        if trial.status != "COMPLETED" and lines:
            return f"trial {trial.trial_id} failed with {lines[-1].strip()}"
    return ""


def no_scored_trial(tuner, directory: str) -> UserError:
    """The one-line error of a search that ended without a scored trial."""
    trials = list(tuner.oracle.trials.values())
    counts = {}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    why = failure(trials)
    return UserError(f"no trial was scored ({len(trials)} trials: {statuses or 'none'})"
                     f"{'; ' + why if why else ''}; see {storage.join(directory, 'trials.csv')}")


def run_search(config: Config, run_dir: str) -> dict:
    """Runs (or resumes) the search; the chief of a distributed search only serves the oracle.
    Returns the results (write_results) with `new_trials`, the trials this call ended (0: the
    search was complete already), or {"role": tuner id} on a worker. A search that ends with no
    scored trial is an error naming trials.csv; so is an objective the training does not log,
    at the end of the first epoch."""
    space = search_space(config)
    check_objective(config, run_dir)
    directory = RunLayout(run_dir).tuning
    storage.makedirs(directory)
    keras.utils.set_random_seed(config.train.seed)
    worker = is_tuner_worker()
    if worker:
        check_worker_config(config, run_dir, space)
        watch_chief(*oracle_address(), config.tune.chief_timeout)
    else:
        if tuner_id():
            check_oracle_port(*oracle_address())
        check_fingerprint(config, run_dir, space)
    tuner = make_tuner(config, TrainerHyperModel(config, run_dir, space), directory)
    if tuner_id() and not worker:  # the chief of a distributed search: a lost worker's trial goes to another
        exit_chief_when_every_trial_ended()
        watch_workers(tuner.oracle, config.tune.worker_timeout)
    elif worker:
        pace_idle(tuner.oracle)
    before = {} if worker else trial_states(tuner)
    if not worker:
        clear_results(run_dir)  # written anew when this search ends
    try:
        tuner.search(epochs=config.train.epochs, verbose=0)
    except ObjectiveNotLogged as error:
        # no trial of this search can ever be scored (the objective is part of its fingerprint):
        # what it holds goes, so the corrected command starts afresh instead of being refused
        kept = ""
        if not worker:
            if any(trial.status == "COMPLETED" for trial in tuner.oracle.trials.values()):
                kept = f"; {directory} kept"
            else:
                storage.remove_tree(directory)
        raise ConfigError(f"{error}; the search stopped in its first epoch{kept}") from None
    except grpc.RpcError as error:  # the chief killed while this worker's call (end_trial, ...) was under way
        if not worker or error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        time.sleep(config.tune.chief_timeout + 10)  # gone for good: watch_chief ends this worker (exit 0) first
        raise
    except RuntimeError as error:  # Keras Tuner's oracle stops after max_consecutive_failed_trials (3)
        if worker or "consecutive failures" not in str(error):
            raise
        write_results(tuner, config, run_dir, space)
        why = failure([t for t in tuner.oracle.trials.values() if t.status == "FAILED"])
        raise UserError(f"Keras Tuner stopped the search after {tuner.oracle.max_consecutive_failed_trials} "
                        f"failed trials in a row{'; ' + why if why else ''}; see "
                        f"{storage.join(directory, 'trials.csv')}") from None
    if worker:  # a worker holds only a client of the chief's oracle: the chief writes the results
        return {"role": tuner_id()}
    result = write_results(tuner, config, run_dir, space)
    if result.get("best_trial") is None:
        raise no_scored_trial(tuner, directory)
    after = trial_states(tuner)
    return {**result, "new_trials": sum(1 for trial_id, status in after.items() if before.get(trial_id) != status)}
