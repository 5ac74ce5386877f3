"""The Python API, for notebooks (Jupyter, Colab, Kaggle) and scripts; the `kcp` command is a
thin layer over it.

    import kcp
    run = kcp.Run("runs/nb")                       # a run directory, local or gs://
    contract = run.preprocess(source="digits")
    result = run.train(model="cnn", overrides=["train.epochs=5"])
    export_dir = run.export()
    run.report()                                   # shows the figures inline in Jupyter

    lm = kcp.Run("runs/lm")                        # a language model on Python's standard library
    lm.preprocess(model="gpt")                     # gpt's default source: python-stdlib
    lm.train(model="gpt", overrides=["train.epochs=1"])
    print(lm.generate("def fib(n):", max_new_tokens=64, temperature=0))

Every function takes the run directory first and the same configuration inputs as the
command line: a YAML file (`config_file`), `source`/`model` shortcuts and dotted
`overrides` ("train.epochs=5"), layered over the run's recorded config.yaml. Stages that
produce something record the config they ran with in RUN/config.yaml.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from dataclasses import dataclass, field

import trainer.models  # noqa: F401  registers the model families, whose keys the config loader validates
from deploy.predict import export_modality, plan_input, prediction_version, run_batch_prediction
from deploy.push import push_export
from kcp.core import contract as contract_lib
from kcp.core import storage
from kcp.core.beamio import beam_arg_list
from kcp.core.cluster import effective_strategy, is_cluster_helper, is_tuner_worker
from kcp.core.config import Config
from kcp.core.config_load import config_recorded, override_list, record_config, resolve_config
from kcp.core.contract import GENERATE_DEFAULTS, DataContract
from kcp.core.errors import UserError
from kcp.core.layout import (RunLayout, export_versions, is_blessed, new_run_dir, newest_blessed, newest_run,
                             read_verdict, run_path, takes_run_dir)
from kcp.core.lock import run_lock
from kcp.results import Report, TrainResult, TuneResult
from pipeline.preprocess import run_preprocess

# The stages that need TensorFlow or Keras are imported in the functions that run them: importing them
# costs about 5 s and 0.5 GB, which `kcp preprocess` and `kcp push` never pay (docs/performance.md).

# --- the stages -------------------------------------------------------------------------

@contextlib.contextmanager
def locked(run_dir: str, command: str, helper: bool = False):
    """Holds RUN/.kcp-lock (kcp/core/lock.py) while a producing stage writes into the run
    directory; a second one fails at once with a one-line error naming the holder. Re-entrant
    in one process (`kcp run` holds it over its stages); not taken by a `helper` (a cluster's
    non-chief member, `is_cluster_helper`), whose chief holds it."""
    if helper:
        yield
        return
    if command not in ("preprocess", "run") and not storage.exists(run_dir):  # a mistyped --run-dir: the
        contract_lib.read_contract(run_dir)  # stage's own error, and no folder made for the lock
    with run_lock(run_dir, command):
        yield


@takes_run_dir
def preprocess(run_dir: str, source: str | None = None, *, model: str | None = None, config_file: str | None = None,
               overrides=(), beam_args=(), progress=None) -> DataContract:
    """Runs the Beam pipeline: RUN/data/ shards and metadata.json. Returns the data contract.
    `model` is the family the data is for (gpt: a language source by default)."""
    with locked(run_dir, "preprocess"):
        config = resolve_config(run_dir, config_file, source=source, model=model, overrides=overrides)
        return run_preprocess(config, run_dir, beam_arg_list(beam_args), report=progress,
                              planned=lambda: record_config(run_dir, config))  # a bad source records nothing


@takes_run_dir
def train(run_dir: str, model: str | None = None, *, config_file: str | None = None, overrides=()) -> TrainResult:
    """Trains on RUN/data and writes RUN/train/."""
    from trainer.global_state import caller_state_kept

    # resolved before the lock too: its strategy says whether this process is a cluster's helper
    strategy = resolve_config(run_dir, config_file, model=model, overrides=overrides, data_fixed=True).train.strategy
    helper = is_cluster_helper(strategy)
    with locked(run_dir, "train", helper), caller_state_kept():
        config = resolve_config(run_dir, config_file, model=model, overrides=overrides, data_fixed=True)
        contract_lib.read_contract(run_dir)  # no data: one line, and no config.yaml recorded for a run that is not
        from trainer.train import train as train_model

        with config_recorded(run_dir, config, helper):  # a train that fails with one line records nothing
            return _train_result(run_dir, train_model(config, run_dir), config.train.strategy)


def _train_result(run_dir: str, metrics: dict, strategy: str) -> TrainResult:
    from trainer.outputs import TrainPaths

    outputs = TrainPaths.resolve(run_dir, multi_worker=effective_strategy(strategy) == "multi_worker").outputs
    history_path = storage.join(outputs, os.path.basename(RunLayout(run_dir).history))
    history = json.loads(storage.read_text(history_path)) if storage.exists(history_path) else {}
    return TrainResult(metrics=metrics, history=history, model_path=RunLayout(run_dir).model, train_dir=outputs)


@takes_run_dir
def tune(run_dir: str, model: str | None = None, *, config_file: str | None = None, overrides=()) -> TuneResult:
    """Keras Tuner search (RUN/tuning/); with `tune.retrain_best`, retrains the best config on
    train + validation and exports it, unless the search was complete and its best trial already
    retrained and exported (RUN/tuning/retrained.json): then `retrained` is None and `export_dir`
    the recorded export. Workers of a distributed search return their role only."""
    from deploy.export import export_for_serving
    from trainer.generate import generate_tokens
    from trainer.train import train as train_model
    from tuning.results import best_config, record_retrained, retrained_export
    from trainer.global_state import caller_state_kept
    from tuning.search import run_search, wait_for_chief

    with locked(run_dir, "tune", is_tuner_worker()), caller_state_kept():
        config = resolve_config(run_dir, config_file, model=model, overrides=overrides, data_fixed=True)
        if is_tuner_worker():  # the chief records config.yaml and the search's fingerprint before its oracle serves
            wait_for_chief(config.tune.chief_timeout)
            config = resolve_config(run_dir, config_file, model=model, overrides=overrides)
        contract_lib.read_contract(run_dir)  # as train
        with config_recorded(run_dir, config, is_tuner_worker()):
            summary = run_search(config, run_dir)
            if not config.tune.retrain_best or is_tuner_worker():  # a worker searches only; the chief, once
                return TuneResult(summary)  # every trial is done, retrains the best config as a search alone does
            final = best_config(config, run_dir)
            recorded = retrained_export(run_dir, summary, final)
            if recorded:  # a complete search whose best trial was retrained and exported: not again
                return TuneResult(summary, None, recorded)
            retrained = _train_result(run_dir, train_model(final, run_dir), final.train.strategy)
            export_dir = export_for_serving(final, run_dir, generate_tokens)
            record_retrained(run_dir, summary, final, export_dir)
            return TuneResult(summary, retrained, export_dir)


@takes_run_dir
def export(run_dir: str, *, config_file: str | None = None, overrides=()) -> str:
    """Exports RUN/train/model.keras as RUN/export/NAME/VERSION; returns that directory."""
    with locked(run_dir, "export"):
        config = resolve_config(run_dir, config_file, overrides=overrides)
        from deploy.export import export_for_serving
        from trainer.generate import generate_tokens  # also registers the gpt layers, for loading its model.keras

        with config_recorded(run_dir, config):  # an export refused (unfinished, stale) records nothing
            return export_for_serving(config, run_dir, generate_tokens)


@takes_run_dir
def validate(run_dir: str, version: int | None = None, *, overrides=()) -> dict:
    """Runs the test split through the export from raw inputs; writes validation.json (blessed or not).
    Returns its content, and `lost_blessing` when this validation withdrew the version's earlier
    blessing: the version kcp serve and predict use instead (None: no blessed one)."""
    from deploy.validate import validate_export

    config = resolve_config(run_dir, overrides=overrides)
    layout = RunLayout(run_dir)
    was_blessed = is_blessed(layout.version_dir(config.export.name, version))
    result = validate_export(config, run_dir, version)
    if was_blessed and not result["blessed"]:
        return {**result, "lost_blessing": newest_blessed(layout.export_root(config.export.name))}
    return result


@takes_run_dir
def push(run_dir: str, destination: str, version: int | None = None, *, force: bool = False,
         dest_version: int | str | None = None, overrides=()) -> list[str]:
    """Copies a blessed export version to `gs://BUCKET/PATH/VERSION/` (`dest_version`: another number,
    or "next", one above the highest there); returns the URIs written, saved_model.pb last."""
    config = resolve_config(run_dir, overrides=overrides)
    return push_export(RunLayout(run_dir).version_dir(config.export.name, version), destination, force=force,
                       dest_version=dest_version, max_regression=config.export.max_regression)


@takes_run_dir
def predict(run_dir: str, input: str, output: str, version: int | None = None, *, beam_args=(),  # noqa: A002
            overrides=(), single_file: bool = False, progress=None) -> list[str]:
    """Beam batch prediction of a source (as for preprocess) through the export; returns the files
    written: `OUTPUT-00000-of-000NN.jsonl` shards (a trailing `.jsonl` of OUTPUT is dropped),
    or OUTPUT itself with `single_file`. Unreadable inputs go to the dead letters beside them.
    Without `version`, the newest version `kcp validate` blessed, as `kcp serve` answers with (the
    newest version when none is blessed); `progress` is told which."""
    config = resolve_config(run_dir, overrides=overrides)
    contract_lib.read_contract(run_dir)  # a run that was never preprocessed: that error first
    say = progress or (lambda line: None)
    directory = prediction_version(RunLayout(run_dir), config.export.name, version, say)
    modality = export_modality(directory)  # the export's own: RUN/data may have been preprocessed again since
    if modality == "language":
        raise UserError(f"predict: {run_dir} holds a language model, which generates rather than classifies; "
                        f"use `kcp generate --run-dir {run_dir} --prompt TEXT` or the export's generate and score "
                        "signatures")
    data = config.data  # the run's data.limit (a quick trial's) does not cap what is predicted; --set can
    if not any(item.startswith("data.limit=") for item in override_list(overrides)):
        data = dataclasses.replace(data, limit=0)
    # the export's kind, not one a later preprocess recorded (int series are read as the sequence model's)
    data = dataclasses.replace(data, modality=modality if modality in ("image", "sequence") else None)
    plan = plan_input(input, data, modality)
    say(f"{input} through {directory}")
    return run_batch_prediction(directory, plan, output, beam_arg_list(beam_args), single_file, report=progress)


@takes_run_dir
def versions(run_dir: str) -> list[dict]:
    """The run's export versions, each model's newest first: {"model", "version", "validated", "blessed", "served"
    (what `kcp serve` answers with), "reasons", and validate's "export_accuracy" (gpt: "export_bits_per_byte")
    and "examples"}."""
    layout, rows = RunLayout(run_dir), []
    names = sorted(storage.list_dir(layout.exports)) if storage.exists(layout.exports) else []
    for name in names:
        served = newest_blessed(root := layout.export_root(name))
        for version in reversed(export_versions(root)):
            record = read_verdict(storage.join(root, str(version)))
            found = record or {}
            rows.append({"model": name, "version": version, "validated": record is not None,
                         "blessed": found.get("blessed") is True, "served": version == served,
                         "reasons": list(found.get("reasons") or []),
                         **{key: found[key] for key in ("export_accuracy", "export_bits_per_byte", "examples")
                            if key in found}})
    return rows


@takes_run_dir
def report(run_dir: str) -> Report:
    """Writes RUN/report/index.html and its figures."""
    from kcp.reporting import build_report

    path = build_report(run_dir)
    return Report(path, storage.glob(storage.join(RunLayout(run_dir).report, "*.png")))


@takes_run_dir
def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8501, **options):
    """A ready TF-Serving-compatible server (call `serve_forever`, or use `Run.serve` for a background one).

    `options` are make_server's: `grpc_port` (None: REST only; 0: a free port), `version_policy`
    ("latest:1", "all", "specific:1,3"), `version_labels` ({"stable": 3}), `allow_unvalidated`
    (serve versions kcp validate did not bless), batching and limits. `server_close()` stops it all."""
    from deploy.serving import make_server

    return make_server(run_dir, host, port, **options)


@takes_run_dir
def generate(run_dir: str, prompt: str, *, max_new_tokens: int | None = None,
             temperature: float = GENERATE_DEFAULTS["temperature"], top_k: int = GENERATE_DEFAULTS["top_k"],
             top_p: float = GENERATE_DEFAULTS["top_p"], seed: int = GENERATE_DEFAULTS["seed"]) -> str:
    """The completion of `prompt` by the run's language model (RUN/train/model.keras).

    It runs the export's own `generate` function (deploy/language.py `language_functions`), built
    on model.keras: the same seed gives the text the served `generate` signature answers. The
    prompt starts a document; the completion ends at the end of one or after `max_new_tokens`
    tokens (None: 64, or half the context where that is shorter). temperature 0 is greedy;
    top_k 0 and top_p 1 switch those filters off."""
    import keras

    from deploy.language import checked_generate_arguments, complete_prompt
    from trainer.generate import generate_tokens

    contract = contract_lib.read_contract(run_dir)
    if contract.modality != "language":
        raise UserError(f"generate: {run_dir} holds {contract.modality} data; generation needs a language model "
                        "(kcp run --model gpt)")
    context = int(contract.statistics["context_length"])
    if max_new_tokens is None:
        max_new_tokens = max(1, min(GENERATE_DEFAULTS["max_new_tokens"], context // 2))  # room for the prompt
    arguments = checked_generate_arguments(prompt, context, max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k, top_p=top_p, seed=seed)
    model_path = RunLayout(run_dir).model
    if not storage.exists(model_path):
        raise UserError(f"{model_path}: not found; run `kcp train --run-dir {run_dir}` first")
    contract_lib.check_trained_on_contract(RunLayout(run_dir), run_dir, "generating")  # its tokenizer, context
    return complete_prompt(keras.saving.load_model(model_path, compile=False), contract, run_dir, prompt,
                           generate_tokens, **arguments)


def reloaded_accuracy(export_dir: str, run_dir: str, split: str = "test") -> float:
    """The export's accuracy on a split, fed the raw inputs a client would send."""
    from deploy.validate import export_accuracy

    return export_accuracy(export_dir, run_dir, split)


# --- one small object for notebooks -----------------------------------------------------

@dataclass
class Run:
    """One run directory and the stages on it; each method is the function of the same name."""

    run_dir: str = field(default_factory=new_run_dir)

    def __post_init__(self):
        self.run_dir = run_path(self.run_dir, "Run")  # Run() makes a new one under runs/

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def config(self) -> Config:
        return resolve_config(self.run_dir)

    @property
    def contract(self) -> DataContract:
        return contract_lib.read_contract(self.run_dir)

    def preprocess(self, source: str | None = None, **options) -> DataContract:
        return preprocess(self.run_dir, source, **options)

    def train(self, model: str | None = None, **options) -> TrainResult:
        return train(self.run_dir, model, **options)

    def tune(self, model: str | None = None, **options) -> TuneResult:
        return tune(self.run_dir, model, **options)

    def export(self, **options) -> str:
        return export(self.run_dir, **options)

    def validate(self, version: int | None = None, **options) -> dict:
        return validate(self.run_dir, version, **options)

    def push(self, destination: str, version: int | None = None, **options) -> list[str]:
        return push(self.run_dir, destination, version, **options)

    def predict(self, input: str, output: str, **options) -> list[str]:  # noqa: A002
        return predict(self.run_dir, input, output, **options)

    def report(self) -> Report:
        return report(self.run_dir)

    def versions(self) -> list[dict]:
        return versions(self.run_dir)

    def generate(self, prompt: str, **options) -> str:
        return generate(self.run_dir, prompt, **options)

    def serve(self, port: int = 0, **options):
        """Starts the server in a background thread; returns it (`server.url`, `server.grpc_target` with
        `grpc_port=0`; `with run.serve() as server:`, or `server.shutdown()` then `server.server_close()`,
        stops it and releases its threads and models). Serves blessed versions only unless
        `allow_unvalidated=True`."""
        server = serve(self.run_dir, "127.0.0.1", port, **options)
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        server.grpc_target = f"127.0.0.1:{server.grpc.port}" if server.grpc else None
        threading.Thread(target=server.serve_forever, name="kcp-serve", daemon=True).start()
        return server


__all__ = ["Run", "TrainResult", "TuneResult", "Report", "preprocess", "train", "tune", "export", "validate", "push",
           "predict", "report", "serve", "generate", "versions", "resolve_config", "new_run_dir", "newest_run"]
