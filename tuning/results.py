"""A search's results under RUN/tuning/, and the best trial's config.

trials.csv (one row per trial: values, score, status, seconds, RSS), best_hparams.json,
best_config.yaml (accepted by `kcp train --config`) and trials.png (score per trial and
the best so far). `best_config` turns best_hparams.json into the final run's config;
retrained.json records the export that config was retrained into (`tune.retrain_best`), so
the same tune command run again on a complete search does not retrain it again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json

from kcp.core import storage
from kcp.core.config import Config, ConfigError
from kcp.core.config_load import record_config
from kcp.core.layout import RunLayout
from tuning.hypermodel import read_trial_stats
from tuning.space import native, trial_config


def figures(measured: dict | None) -> list[str]:
    """A trial's seconds and RSS for trials.csv; empty where the process died before it wrote them."""
    if not measured:
        return ["", ""]
    return [f"{measured['seconds']:.1f}", f"{measured['rss_mb']:.0f}"]


def best_trials(trials, direction: str) -> list:
    """The completed trials with a score, best first; equal scores in trial order (the lowest id
    first). Keras Tuner's `get_best_trials` keeps ties in the order its oracle holds its trials,
    which a resumed search reloads in another order: best_config.yaml then named another trial."""
    scored = [t for t in trials if t.status == "COMPLETED" and t.score is not None]
    sign = -1 if direction == "max" else 1
    return sorted(scored, key=lambda t: (sign * t.score, t.trial_id))


RESULT_FILES = ("best_hparams.json", "best_config.yaml", "trials.csv", "trials.png")


def clear_results(run_dir: str) -> None:
    """Removes the results of an earlier search before this one runs: a resumed or extended search
    killed midway must not leave the old search's best_config.yaml looking like its own."""
    for name in RESULT_FILES:
        storage.remove(storage.join(RunLayout(run_dir).tuning, name))


def write_results(tuner, config: Config, run_dir: str, space: dict) -> dict:
    """trials.csv, best_hparams.json, best_config.yaml and trials.png under RUN/tuning/."""
    layout = RunLayout(run_dir)
    directory = layout.tuning
    stats = read_trial_stats(directory)
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id)
    keys = list(space)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial_id", *keys, config.tune.objective, "status", "seconds", "rss_mb"])
    for trial in trials:
        score = trial.score
        writer.writerow([trial.trial_id, *[native(trial.hyperparameters.values.get(k, ""), space[k]) for k in keys],
                         "" if score is None else f"{score:.6f}", trial.status,
                         *figures(stats.get(trial.trial_id))])
    storage.write_text_atomic(storage.join(directory, "trials.csv"), buffer.getvalue())

    best = best_trials(trials, config.tune.direction)[:1]
    result = {"trials": len(trials), "completed": sum(1 for t in trials if t.status == "COMPLETED")}
    if best:
        values = {k: native(best[0].hyperparameters.values[k], space[k]) for k in keys
                  if k in best[0].hyperparameters.values}
        result.update({"best_trial": best[0].trial_id, "objective": config.tune.objective,
                       "best_score": float(best[0].score), "hyperparameters": values})
        storage.write_text_atomic(layout.best_hparams, json.dumps(result, indent=2) + "\n")
        storage.write_text_atomic(storage.join(directory, "best_config.yaml"),
                                  trial_config(config, values, space).to_yaml())
    storage.write_bytes_atomic(storage.join(directory, "trials.png"),
                               plot_scores([trial.score for trial in trials], config))
    return result


def plot_scores(scores: list, config: Config) -> bytes:
    """PNG of each scored trial's objective and the best so far, in trial order."""
    import matplotlib  # here, not at import: choosing the Agg backend is process-wide (as in kcp.reporting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    indices = [i for i, s in enumerate(scores, start=1) if s is not None]
    values = [s for s in scores if s is not None]
    axis.plot(indices, values, "o", label=config.tune.objective)
    pick = max if config.tune.direction == "max" else min
    running = []
    for value in values:
        running.append(value if not running else pick(running[-1], value))
    axis.step(indices, running, where="post", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel(config.tune.objective)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    return png.getvalue()


def best_config(config: Config, run_dir: str) -> Config:
    """The best trial's config (RUN/tuning/best_hparams.json over `config`), fitting on train +
    validation: the config of the final training run after a search."""
    best_path = RunLayout(run_dir).best_hparams
    if not storage.exists(best_path):
        raise ConfigError(f"tune.retrain_best: {best_path} does not exist; no trial completed")
    best = json.loads(storage.read_text(best_path))
    return trial_config(config, {**best["hyperparameters"], "train.include_validation": True})


RETRAINED = "retrained.json"  # RUN/tuning/: the best trial retrained (tune.retrain_best) and its export


def _config_digest(final: Config) -> str:
    """What the retraining and its export depend on: every section but `tune`."""
    plain = {section: values for section, values in final.to_dict().items() if section != "tune"}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def record_retrained(run_dir: str, summary: dict, final: Config, export_dir: str) -> None:
    """Records, after the export, that the best trial was retrained with `final` into `export_dir`;
    RUN/config.yaml becomes `final`, which RUN/train/model.keras and the export were made with."""
    record = {"best_trial": summary["best_trial"], "best_score": summary["best_score"],
              "config_sha256": _config_digest(final), "export_dir": export_dir}
    storage.write_text_atomic(storage.join(RunLayout(run_dir).tuning, RETRAINED), json.dumps(record, indent=2) + "\n")
    record_config(run_dir, final)


def retrained_export(run_dir: str, summary: dict, final: Config) -> str | None:
    """The export recorded by `record_retrained` when retraining now would repeat it: the search
    ran no new trial (`summary["new_trials"]` 0), its best trial and the final config are those
    recorded, and the export is still there. None otherwise: retrain."""
    path = storage.join(RunLayout(run_dir).tuning, RETRAINED)
    if summary.get("new_trials") != 0 or not storage.exists(path):
        return None
    try:
        record = json.loads(storage.read_text(path))
        export_dir = record["export_dir"]
        same = record["best_trial"] == summary["best_trial"] and record["config_sha256"] == _config_digest(final)
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: retrain, and record anew
    if same and storage.exists(storage.join(export_dir, "saved_model.pb")):
        return export_dir
    return None
