"""A distributed search's lost workers: their trials go back to the queue, not into a hang.

Keras Tuner's chief exits once no trial is ongoing and every worker it has seen was told to
stop. A worker that dies mid-trial (a preempted VM, SIGKILL, out of memory) does neither: its
trial stays ongoing and the chief waits for it forever, with the results never written. So each
worker sends a heartbeat (the oracle's GetTrial for its trial) every few seconds while a trial
runs, and the chief returns the trial of a worker it has not heard from for
`tune.worker_timeout` seconds to Keras Tuner's retry queue, which hands it to the next worker
that asks (before any new trial). The chief does not exit while that queue holds a trial: the
search's results are only written once every trial has ended.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from keras_tuner.src.distribute import oracle_chief
from keras_tuner.src.engine.oracle import LOCKS, THREADS

log = logging.getLogger("kcp.tune")


def heartbeat_interval(worker_timeout: float) -> float:
    """How often a worker reports: five times within the chief's timeout, at most every 30 s."""
    return max(0.5, min(30.0, worker_timeout / 5.0))


@contextlib.contextmanager
def heartbeat(oracle, trial_id: str, interval: float):
    """While the block runs, asks the chief's oracle about `trial_id` every `interval` seconds."""
    stop = threading.Event()

    def beat():
        while not stop.wait(interval):
            try:
                oracle.get_trial(trial_id)
            except Exception as error:  # noqa: BLE001  the chief's own watchdog (watch_chief) ends a worker it lost
                log.debug("tune: heartbeat for trial %s not delivered: %s", trial_id, error)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)


def watch_workers(oracle, worker_timeout: float, interval: float | None = None) -> threading.Thread:
    """On the chief: records when each ongoing trial's worker last reported, and sends the trial of
    a worker silent for `worker_timeout` seconds back to the queue for another worker."""
    last_seen: dict[str, float] = {}  # tuner id -> when it last called the oracle
    interval = interval or max(0.5, min(5.0, worker_timeout / 5.0))

    def seen(tuner=None, trial_id=None):
        if tuner is None:  # a call about a trial: its worker is the one running it
            tuner = next((worker for worker, trial in list(oracle.ongoing_trials.items())
                          if trial.trial_id == trial_id), None)
        if tuner is not None:
            last_seen[tuner] = time.monotonic()

    def wrap(name, note):
        method = getattr(oracle, name)

        def wrapped(*args, **kwargs):
            note(*args, **kwargs)
            return method(*args, **kwargs)

        setattr(oracle, name, wrapped)

    wrap("create_trial", lambda tuner, *_, **__: seen(tuner=tuner))
    wrap("update_trial", lambda trial_id, *_, **__: seen(trial_id=trial_id))
    wrap("get_trial", lambda trial_id, *_, **__: seen(trial_id=trial_id))
    end_trial = oracle.end_trial

    def end_trial_once(trial):
        """A worker counted lost that was only slow still ends its trial: kept if the trial waits in
        the queue (taken out of it), ignored if another worker has ended it already."""
        trial_id = trial.trial_id
        with lock(oracle):
            seen(trial_id=trial_id)
            if trial_id in oracle.end_order:
                log.warning("tune: trial %s was already ended by another worker; this report is ignored", trial_id)
                return None
            if trial_id in oracle._retry_queue:  # noqa: SLF001  Keras Tuner keeps no public handle on it
                oracle._retry_queue.remove(trial_id)  # noqa: SLF001
            return end_trial(trial)

    oracle.end_trial = end_trial_once

    def check():
        """Forgets the workers silent for worker_timeout: Keras Tuner's chief waits for every worker
        it has seen (`tuner_ids`), and for every ongoing trial, which goes back to the queue."""
        now = time.monotonic()
        with lock(oracle):
            for worker in list(oracle.tuner_ids):
                silent = now - last_seen.setdefault(worker, now)
                if silent <= worker_timeout:
                    continue
                oracle.tuner_ids.discard(worker)
                last_seen.pop(worker)
                trial = oracle.ongoing_trials.pop(worker, None)
                if trial is None:
                    log.warning("tune: worker %s sent nothing for %.0f s (tune.worker_timeout %g) between trials; "
                                "the chief no longer waits for it", worker, silent, worker_timeout)
                    continue
                oracle._retry_queue.append(trial.trial_id)  # noqa: SLF001  as Oracle.reload does
                oracle.save()
                log.warning("tune: worker %s sent nothing for %.0f s (tune.worker_timeout %g); trial %s goes back "
                            "to the queue for the next worker", worker, silent, worker_timeout, trial.trial_id)

    def watch():
        waiting = None
        while True:
            time.sleep(interval)
            try:
                check()
                queued = list(oracle._retry_queue)  # noqa: SLF001
                if queued and not oracle.tuner_ids and queued != waiting:
                    log.warning("tune: trial %s waits for a worker (start one with `kcp tune --role worker`); the "
                                "chief ends once every trial has ended", ", ".join(queued))
                waiting = queued if queued and not oracle.tuner_ids else None
            except Exception:  # noqa: BLE001  the watchdog must outlive one failed save
                log.exception("tune: checking the workers failed")

    thread = threading.Thread(target=watch, name="worker-watchdog", daemon=True)
    thread.start()
    return thread


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


__all__ = ["exit_chief_when_every_trial_ended", "heartbeat", "heartbeat_interval", "watch_workers"]
