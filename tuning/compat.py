"""Work-arounds for Keras Tuner bugs: each one small, linked, and tested to fail without it."""

from __future__ import annotations

import json

from keras_tuner.src import utils as kt_utils
from keras_tuner.src.engine import oracle as kt_oracle
from keras_tuner.src.engine import trial as kt_trial

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
    """Keeps a resumed search from re-running a trial that had already ended; True once patched.

    keras-tuner 1.4.x `Oracle.end_trial` writes the trial's `trial.json` (COMPLETED, with its
    score) and only then `oracle.json`. A tuner killed between the two leaves the trial
    finished on disk but still "ongoing" in the oracle, and `Oracle.reload` sends every ongoing
    trial for retry: the finished trial is trained again. After the reload, a retried trial
    whose own file says COMPLETED with a score is ended instead, as `end_trial` would have.
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
            self._run_times[trial_id] += 1
            if trial_id not in self.end_order:
                self.end_order.append(trial_id)
            if isinstance(getattr(self, "_populate_next", None), list):  # grid search's next combination
                self._populate_next.append(trial_id)
        if ended:
            self.save()

    kt_oracle.Oracle.reload = reload_keeping_completed
    _PATCHED.add("keras-tuner-resume-completed")
    return True
