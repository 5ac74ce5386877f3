"""Work-arounds for Keras Tuner bugs: each one small, linked, and tested to fail without it."""

from __future__ import annotations

import functools
import json

from keras_tuner.src import utils as kt_utils
from keras_tuner.src.engine import oracle as kt_oracle
from keras_tuner.src.engine import trial as kt_trial
from keras_tuner.src.tuners import gridsearch as kt_grid

from kcp.core import storage

_PATCHED = set()


def patch_keras_tuner_atomic_json() -> bool:
    """Makes Keras Tuner write trial.json and oracle.json atomically; returns True once patched.

    keras-tuner 1.4.x (`keras_tuner.src.utils.save_json`) truncates the file and then
    writes it, so a tuner killed in between (preemption, OOM kill) leaves an empty
    trial.json, and every later resume fails in `Oracle.reload` with
    "JSONDecodeError: Expecting value: line 1 column 1". Writing a temporary file and
    renaming it over the old one leaves either the old state or the new one.
    """
    if "keras-tuner-atomic-json" in _PATCHED:
        return True

    def save_json(path, obj):
        text = json.dumps(obj)
        storage.write_text_atomic(str(path), text)
        return text

    kt_utils.save_json = save_json
    _PATCHED.add("keras-tuner-atomic-json")
    return True


def patch_keras_tuner_resume_completed() -> bool:
    """Keeps a resumed search from re-running a trial that had already ended, and lets a grid
    search resume at all; True once patched.

    keras-tuner 1.4.x `Oracle.end_trial` writes the trial's `trial.json` (COMPLETED, with its
    score), then `oracle.json`, and only then drops the trial from `ongoing_trials`: every
    `oracle.json` it writes still lists the trial as ongoing, until the next trial is created (a
    finished search's last trial, always). `Oracle.reload` sends every ongoing trial for retry,
    so a tuner killed between trials, or a finished search run again, trained that trial again.
    After the reload, a retried trial whose own file says COMPLETED with a score is ended
    instead, as `end_trial` would have (counted once).

    `GridSearchOracle` keeps its walk through the grid (`_ordered_ids`, `_populate_next`) out of
    `oracle.json`: a resumed grid search failed with `KeyError` at its next trial. Both are
    rebuilt from the reloaded trials: every trial in grid order, and each ended one queued to
    give its next combination (those already tried are skipped, as in an uninterrupted search).
    """
    if "keras-tuner-resume-completed" in _PATCHED:
        return True
    reload = kt_oracle.Oracle.reload

    def reload_keeping_completed(self):
        reload(self)
        ended = [trial_id for trial_id in self._retry_queue
                 if self.trials[trial_id].status == kt_trial.TrialStatus.COMPLETED
                 and self.trials[trial_id].score is not None]
        for trial_id in ended:
            self._retry_queue.remove(trial_id)
            if trial_id not in self.end_order:  # killed after trial.json, before oracle.json
                self._run_times[trial_id] += 1
                self.end_order.append(trial_id)
        if isinstance(self, kt_grid.GridSearchOracle):
            rebuild_grid_walk(self)
        if ended:
            self.save()

    kt_oracle.Oracle.reload = reload_keeping_completed
    _PATCHED.add("keras-tuner-resume-completed")
    return True


def rebuild_grid_walk(oracle) -> None:
    """A reloaded grid oracle's `_ordered_ids` (every trial, in grid order) and `_populate_next`
    (the ended trials, whose next combinations the next trials take)."""
    ordered = sorted(oracle.trials, key=functools.cmp_to_key(
        lambda a, b: oracle._compare(oracle.trials[a].hyperparameters.values, oracle.trials[b].hyperparameters.values)))
    oracle._ordered_ids = kt_grid.LinkedList()
    for trial_id in ordered:
        oracle._ordered_ids.insert(trial_id)
    oracle._populate_next = [trial_id for trial_id in ordered if trial_id not in oracle._retry_queue]
