"""A distributed search's lost workers: their trials go back to the queue, not into a hang.

Keras Tuner's chief exits once no trial is ongoing and every worker it has seen was told to
stop. A worker that dies mid-trial (a preempted VM, SIGKILL, out of memory) does neither: its
trial stays ongoing and the chief waits for it forever, with the results never written. So each
worker sends a heartbeat (the oracle's GetTrial for its trial) every HEARTBEAT_SECONDS while a
trial runs, and the chief returns the trial of a worker it has not heard from for
`tune.worker_timeout` seconds to Keras Tuner's retry queue, which hands it to the next worker
that asks (before any new trial). Workers that ask while the last trials run, or while a trial
waits in the queue, are told to wait (IDLE) instead of to stop, so a worker is left to take a
lost trial of the last wave; and the chief does not exit while a trial waits in the queue.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from keras_tuner.src.distribute import oracle_chief
from keras_tuner.src.engine import trial as trial_module
from keras_tuner.src.engine.oracle import LOCKS, THREADS

log = logging.getLogger("kcp.tune")

HEARTBEAT_SECONDS = 2.0  # fixed, so that a chief's tune.worker_timeout (at least 10 s) holds for every worker
RUNNING, IDLE, STOPPED = trial_module.TrialStatus.RUNNING, trial_module.TrialStatus.IDLE, trial_module.TrialStatus.STOPPED


@contextlib.contextmanager
def heartbeat(oracle, trial_id: str, interval: float = HEARTBEAT_SECONDS):
    """While the block runs, asks the chief's oracle about `trial_id` every `interval` seconds."""
    stop = threading.Event()

    def beat():
        while not stop.wait(interval):
            try:
                oracle.get_trial(trial_id)
            except Exception as error:  # noqa: BLE001  the worker's own watchdog (watch_chief) ends it if the chief is gone
                log.debug("tune: heartbeat for trial %s not delivered: %s", trial_id, error)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)


def pace_idle(oracle, interval: float = HEARTBEAT_SECONDS) -> None:
    """On a worker: waits `interval` after an IDLE answer before asking again (Keras Tuner's loop
    asks again at once, which would keep the chief's one-thread server busy)."""
    create_trial = oracle.create_trial

    def create_trial_paced(tuner_id):
        trial = create_trial(tuner_id)
        if trial.status == IDLE:
            time.sleep(interval)
        return trial

    oracle.create_trial = create_trial_paced


def watch_workers(oracle, worker_timeout: float, interval: float | None = None):
    """On the chief: records when each worker last called the oracle, and sends the trial of a worker
    silent for `worker_timeout` seconds back to the queue for another worker. Returns a function
    that stops the watch."""
    last_seen: dict[str, float] = {}  # tuner id -> when it last called the oracle
    assigned: dict[str, str] = {}  # trial id -> the tuner id it was last given to
    interval = interval or max(0.5, min(5.0, worker_timeout / 5.0))
    stopped = threading.Event()

    def seen(tuner):
        if tuner is not None:
            last_seen[tuner] = time.monotonic()

    create_trial, update_trial, get_trial, end_trial = (
        oracle.create_trial, oracle.update_trial, oracle.get_trial, oracle.end_trial)

    def create_trial_waiting(tuner_id):
        """Keras Tuner's, but a worker asking while trials are still running or queued waits (IDLE)
        instead of stopping: one of them may be lost, and its trial needs a worker."""
        with lock(oracle):
            seen(tuner_id)
            trial = create_trial(tuner_id)
            if trial.status == RUNNING:
                assigned[trial.trial_id] = tuner_id
            elif trial.status == STOPPED and (oracle.ongoing_trials or oracle._retry_queue):  # noqa: SLF001
                oracle.tuner_ids.add(tuner_id)  # Keras Tuner let it go; it waits instead
                trial = trial_module.Trial(oracle.get_space(), trial_id=trial.trial_id, status=IDLE)
            return trial

    def update_trial_unless_ended(trial_id, metrics, step=0):
        with lock(oracle):
            seen(assigned.get(trial_id))
            if trial_id in oracle.end_order:  # a worker dropped as lost that was only slow: its trial ended
                return oracle.trials[trial_id]
            return update_trial(trial_id, metrics, step=step)

    def get_trial_seen(trial_id):
        seen(assigned.get(trial_id))
        return get_trial(trial_id)

    def end_trial_once(trial):
        """A worker dropped as lost that was only slow still ends its trial: kept if the trial waits in
        the queue (taken out of it), ignored if the trial has ended already."""
        trial_id = trial.trial_id
        with lock(oracle):
            seen(assigned.get(trial_id))
            if trial_id in oracle.end_order:
                late = trial_id
            else:
                late = None
                if trial_id in oracle._retry_queue:  # noqa: SLF001  Keras Tuner keeps no public handle on it
                    oracle._retry_queue.remove(trial_id)  # noqa: SLF001
                end_trial(trial)
        if late:
            log.warning("tune: trial %s had ended already; a second report of it is ignored", late)

    oracle.create_trial, oracle.update_trial = create_trial_waiting, update_trial_unless_ended
    oracle.get_trial, oracle.end_trial = get_trial_seen, end_trial_once

    def check(now: float) -> tuple[list[str], list[str]]:
        """Forgets the workers silent for worker_timeout (Keras Tuner's chief waits for every worker it
        has seen, `tuner_ids`); a forgotten worker's ongoing trial goes back to the queue."""
        said = []
        with lock(oracle):
            for worker in list(oracle.tuner_ids):
                silent = now - last_seen.setdefault(worker, now)
                if silent <= worker_timeout:
                    continue
                oracle.tuner_ids.discard(worker)
                last_seen.pop(worker)
                trial = oracle.ongoing_trials.pop(worker, None)
                if trial is None:
                    said.append(f"tune: worker {worker} sent nothing for {silent:.0f} s (tune.worker_timeout "
                                f"{worker_timeout:g}) between trials; the chief no longer waits for it")
                    continue
                oracle._retry_queue.append(trial.trial_id)  # noqa: SLF001  as Oracle.reload does
                oracle.save()
                said.append(f"tune: worker {worker} sent nothing for {silent:.0f} s (tune.worker_timeout "
                            f"{worker_timeout:g}); trial {trial.trial_id} goes back to the queue for the next worker")
            queued = list(oracle._retry_queue) if not oracle.tuner_ids else []  # noqa: SLF001
        return said, queued

    def watch():
        waiting, last = None, time.monotonic()
        while not stopped.wait(interval):
            now = time.monotonic()
            if now - last > interval + worker_timeout / 2:  # this process was frozen, not the workers silent
                for worker in list(last_seen):
                    last_seen[worker] = now
            last = now
            try:
                said, queued = check(now)
            except Exception:  # noqa: BLE001  the watch must outlive one failed save
                log.exception("tune: checking the workers failed")
                continue
            for line in said:
                log.warning("%s", line)
            if queued and queued != waiting:
                log.warning("tune: trial %s waits for a worker (start one with `kcp tune --role worker`); the "
                            "chief ends once every trial has ended", ", ".join(queued))
            waiting = queued or None

    threading.Thread(target=watch, name="worker-watchdog", daemon=True).start()
    return stopped.set


@contextlib.contextmanager
def lock(oracle):
    """The lock Keras Tuner's `synchronized` oracle methods hold (re-entrant for the thread holding it)."""
    name = threading.current_thread().name
    acquired = THREADS[oracle] != name
    if acquired:
        LOCKS[oracle].acquire()
        THREADS[oracle] = name
    try:
        yield
    finally:
        if acquired:
            THREADS[oracle] = None
            LOCKS[oracle].release()


def exit_chief_when_every_trial_ended() -> None:
    """Keras Tuner's chief exits when no trial is ongoing and no worker is left; not while a lost
    worker's trial waits in the queue for another (kt 1.4's `exit_chief`, read by `start_server`)."""
    if getattr(oracle_chief.exit_chief, "kcp_patched", False):
        return
    original = oracle_chief.exit_chief

    def exit_chief(oracle):
        return original(oracle) and not oracle._retry_queue  # noqa: SLF001

    exit_chief.kcp_patched = True
    oracle_chief.exit_chief = exit_chief


__all__ = ["HEARTBEAT_SECONDS", "exit_chief_when_every_trial_ended", "heartbeat", "pace_idle", "watch_workers"]
