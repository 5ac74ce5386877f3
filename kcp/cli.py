"""The `kcp` command line: one subcommand per stage, and `run` for all of them in order.

    kcp run                                   # the embedded digits, end to end
    kcp train --run-dir runs/r1 --set train.epochs=5

A user error (bad key, missing file, unknown source) prints one line and exits 2;
`--verbose` adds the traceback. Beam pipeline options go after `--`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
import traceback

from kcp.core.errors import UserError
from kcp.core.layout import RunLayout

EXAMPLES = {
    "preprocess": [
        "kcp preprocess --source digits --run-dir runs/digits",
        "kcp preprocess --run-dir runs/digits --set data.num_shards=4 -- --direct_num_workers=2",
    ],
    "train": [
        "kcp train --run-dir runs/digits --set train.epochs=10 --set train.optimizer=momentum",
    ],
    "export": [
        "kcp export --run-dir runs/digits --set export.name=digits",
    ],
    "run": [
        "kcp run",
        "kcp run --run-dir runs/digits --model cnn --set train.epochs=20",
    ],
    "tune": [
        "kcp tune --run-dir runs/digits --model resnet --set tune.algorithm=bayesian --set tune.max_trials=8",
        "kcp tune --run-dir gs://B/runs/r --role chief --oracle 10.0.0.2:8000   # and on each worker: --role worker",
    ],
    "validate": [
        "kcp validate --run-dir runs/digits --set export.min_accuracy=0.95",
    ],
    "push": [
        "kcp push --run-dir runs/digits --to gs://BUCKET/models/digits",
    ],
    "serve": [
        "kcp serve --run-dir runs/digits --port 8501",
        "curl -s localhost:8501/v1/models/model:predict -d '{\"instances\": [{\"b64\": \"'$(base64 -w0 digit.png)'\"}]}'",
    ],
    "predict": [
        "kcp predict --run-dir runs/digits --input folder:new_images --output predictions.jsonl",
    ],
    "report": [
        "kcp report --run-dir runs/digits",
    ],
    "describe-model": [
        "kcp describe-model --model resnet --set model.depth=56 --input-shape 32,32,3 --num-classes 10",
        "kcp describe-model --model transformer --input-shape 100 --modality text --vocab-size 20000 --num-classes 2",
        "kcp describe-model --run-dir runs/digits",
    ],
}

DESCRIPTIONS = {
    "preprocess": "Read a source with Apache Beam, split, analyze, and write TFRecords + RUN/data/metadata.json.",
    "train": "Train a model on RUN/data and write RUN/train/ (model.keras, metrics.json, history.json).",
    "export": "Export RUN/train/model.keras as a SavedModel in RUN/export/NAME/VERSION/.",
    "run": "preprocess, train and export in order, then reload the export and check its accuracy.",
    "tune": "Keras Tuner search over the trainer's configs; writes RUN/tuning/ (trials.csv, best_config.yaml).",
    "validate": "Run the test split through the export from raw inputs; bless it or not (validation.json).",
    "push": "Copy a blessed export version to gs:// with the google-cloud-storage client.",
    "serve": "Serve RUN/export/ over TF Serving's REST API (predict, classify, metadata).",
    "predict": "Batch prediction with Beam RunInference over the export; writes JSON lines.",
    "report": "Write RUN/report/index.html: curves, confusion matrix, mistakes, filters, attention, augmentation.",
    "describe-model": "Print a model's layers and parameter count for an input spec or a run's contract.",
}

RUNS_ROOT = "runs"


def sys_argv() -> list[str]:
    return sys.argv[1:]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kcp", description="keras-cloud-pipeline: raw data to a served Keras model.",
        epilog="example:\n  kcp run", formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in EXAMPLES:
        sub = commands.add_parser(
            name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name],
            epilog="examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name]),
            formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--run-dir", "--job-dir", dest="run_dir", metavar="RUN",
                         help="the run directory, local or gs:// (default: a new runs/<UTC timestamp> for "
                              "preprocess and run; the newest run under runs/ otherwise)")
        sub.add_argument("--config", metavar="FILE", help="a YAML file with sections data, model, train, tune, export")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value (YAML syntax); repeatable")
        sub.add_argument("--verbose", action="store_true", help="debug logging and tracebacks")
        if name in ("preprocess", "run"):
            sub.add_argument("--source", help="short for --set data.source=SOURCE (e.g. digits)")
        if name in ("train", "run", "describe-model", "tune"):
            sub.add_argument("--model", help="short for --set model.name=NAME")
        if name == "tune":
            sub.add_argument("--role", choices=("chief", "worker"), help="distributed search: this process's role")
            sub.add_argument("--oracle", metavar="HOST:PORT", help="the chief's address (KERASTUNER_ORACLE_IP/PORT)")
            sub.add_argument("--tuner-id", help="this worker's id (default: worker-<host>-<pid>)")
        if name in ("validate", "push", "predict"):
            sub.add_argument("--version", type=int, help="export version (default: the newest)")
        if name == "push":
            sub.add_argument("--to", required=True, metavar="gs://BUCKET/PATH", help="destination; VERSION is appended")
            sub.add_argument("--force", action="store_true", help="push a version that is not blessed")
        if name == "serve":
            sub.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
            sub.add_argument("--port", type=int, default=8501)
            sub.add_argument("--max-batch-size", type=int, default=32, help="rows per batched model call")
            sub.add_argument("--batch-timeout-ms", type=float, default=2.0, help="wait for more rows this long")
            sub.add_argument("--no-batching", action="store_true", help="one model call per request")
            sub.add_argument("--max-request-mb", type=float, default=10.0, help="largest request body")
        if name == "predict":
            sub.add_argument("--input", required=True, metavar="SOURCE", help="a source URI, as for preprocess")
            sub.add_argument("--output", required=True, metavar="PATH", help="the JSON-lines file to write")
        if name == "describe-model":
            sub.add_argument("--input-shape", help="one example's shape, e.g. 32,32,3 (image), 100,3 (sequence), 200 (text)")
            sub.add_argument("--num-classes", type=int, help="number of classes")
            sub.add_argument("--modality", choices=("image", "sequence", "text"),
                             help="default: from the rank of --input-shape (3: image, 2: sequence, 1: text)")
            sub.add_argument("--vocab-size", type=int, default=0, help="text: vocabulary size including padding and OOV")
    return parser


def utc_run_dir() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate, suffix = os.path.join(RUNS_ROOT, stamp), 1
    while os.path.exists(candidate):
        suffix += 1
        candidate = os.path.join(RUNS_ROOT, f"{stamp}-{suffix}")
    return candidate


def newest_run_with_data() -> str | None:
    if not os.path.isdir(RUNS_ROOT):
        return None
    runs = [os.path.join(RUNS_ROOT, name) for name in os.listdir(RUNS_ROOT)]
    runs = [run for run in runs if os.path.exists(os.path.join(run, "data", "metadata.json"))]
    return max(runs, key=os.path.getmtime) if runs else None


def resolve_run_dir(args) -> str:
    if args.run_dir:
        return args.run_dir.rstrip("/") or args.run_dir
    if args.command in ("preprocess", "run"):
        return utc_run_dir()
    newest = newest_run_with_data()
    if newest is None:
        raise UserError(f"--run-dir: not given and no run under {RUNS_ROOT}/ has data; run `kcp preprocess` first")
    logging.getLogger("kcp").info("using the newest run, %s", newest)
    return newest


def resolve_config(args, run_dir: str | None):
    """Defaults <- RUN/config.yaml <- --config <- --source/--model <- --set."""
    from kcp.core import storage
    from kcp.core.config import load_config, read_yaml_file

    layers = []
    existing = storage.join(run_dir, "config.yaml") if run_dir else None
    if existing and storage.exists(existing):
        layers.append(read_yaml_file(existing))
    if args.config:
        layers.append(read_yaml_file(args.config))
    if getattr(args, "source", None):
        layers.append({"data": {"source": args.source}})
    if getattr(args, "model", None):
        layers.append({"model": {"name": args.model}})
    return load_config(layers, args.overrides)


def _configure_logging(verbose: bool) -> None:
    # TensorFlow's C++ INFO lines (oneDNN, CPU features) are not warnings; keep its warnings.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "1")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kcp").setLevel(logging.DEBUG if verbose else logging.INFO)


def say(text: str) -> None:
    print(text, flush=True)


# --- commands ---------------------------------------------------------------------------

def cmd_preprocess(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from pipeline.preprocess import run_preprocess

    say(f"[preprocess] {config.data.source} -> {run_dir}/data")
    contract = run_preprocess(config, run_dir, beam_args, report=lambda line: say(f"[preprocess] {line}"))
    if contract.bad_examples:
        say(f"[preprocess] {contract.bad_examples} bad inputs: reasons in {run_dir}/data/dead_letter/")
    return {"contract": contract}


def cmd_train(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from trainer.train import train

    say(f"[train] {config.model.name}, {config.train.epochs} epochs, batch {config.train.batch_size}, "
        f"{config.train.optimizer} lr {config.train.learning_rate:g}")
    metrics = train(config, run_dir)
    say(f"[train] test accuracy {metrics.get('test', {}).get('accuracy', float('nan')):.4f}, "
        f"{metrics['examples_per_second']:.0f} examples/s, {metrics['wall_seconds']:.1f} s -> {run_dir}/train")
    return {"metrics": metrics}


def cmd_export(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from deploy.export import export_for_serving

    path = export_for_serving(config, run_dir)
    say(f"[export] SavedModel -> {path}")
    return {"export_dir": path}


def cmd_run(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from deploy.validate import export_accuracy

    started = time.perf_counter()
    results = {}
    results.update(cmd_preprocess(config, run_dir, beam_args, args))
    results.update(cmd_train(config, run_dir, [], args))
    results.update(cmd_export(config, run_dir, [], args))
    trainer_accuracy = results["metrics"]["test"]["accuracy"]
    reloaded = export_accuracy(results["export_dir"], run_dir, "test")
    metrics, contract = results["metrics"], results["contract"]
    say("")
    say(f"kcp run: done in {time.perf_counter() - started:.0f} s — {run_dir}")
    say(f"  data      {contract.source}: " + ", ".join(f"{s} {i.count}" for s, i in contract.splits.items())
        + f" examples; {contract.bad_examples} bad")
    say(f"  model     {metrics['model']}, {metrics['params']:,} parameters, {metrics['epochs']} epochs, "
        f"{metrics['examples_per_second']:.0f} examples/s")
    say("  accuracy  " + " · ".join(f"{split} {metrics[split]['accuracy']:.4f}"
                                    for split in ("train", "validation", "test") if split in metrics))
    say(f"  export    {results['export_dir']}")
    say(f"  reloaded  export test accuracy {reloaded:.4f} (trainer {trainer_accuracy:.4f}, "
        f"difference {abs(reloaded - trainer_accuracy):.4f})")
    results["export_accuracy"] = reloaded
    results.update(cmd_report(config, run_dir, [], args))
    return results


def cmd_tune(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    import socket

    from tuning.search import retrain_best, run_search

    if args.role:
        if not args.oracle or ":" not in args.oracle:
            raise UserError("--oracle: a distributed search needs the chief's HOST:PORT")
        host, port = args.oracle.rsplit(":", 1)
        tuner_id = "chief" if args.role == "chief" else (args.tuner_id or f"worker-{socket.gethostname()}-{os.getpid()}")
        if args.role == "worker" and "chief" in tuner_id:
            raise UserError(f"--tuner-id: {tuner_id!r} contains 'chief', which Keras Tuner reserves for the chief")
        os.environ.update(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=port)
    role = os.environ.get("KERASTUNER_TUNER_ID", "")
    say(f"[tune] {config.tune.algorithm} over {config.model.name}"
        + (f" as {role} of {os.environ.get('KERASTUNER_ORACLE_IP')}:{os.environ.get('KERASTUNER_ORACLE_PORT')}"
           if role else f", {config.tune.max_trials} trials"))
    result = run_search(config, run_dir)
    if result.get("best_trial") is not None:
        say(f"[tune] best trial {result['best_trial']}: {result['objective']} {result['best_score']:.4f} "
            f"{json.dumps(result['hyperparameters'])} -> {run_dir}/tuning/best_config.yaml")
    if config.tune.retrain_best and "chief" not in role and "worker" not in role:
        result["retrained"] = retrain_best(config, run_dir)
        say(f"[tune] retrained the best config on train + validation, exported to {result['retrained']['export_dir']}")
    return {"tuning": result}


def cmd_validate(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from deploy.validate import validate_export

    result = validate_export(config, run_dir, getattr(args, "version", None))
    verdict = "blessed" if result["blessed"] else "NOT blessed: " + "; ".join(result["reasons"])
    say(f"[validate] version {result['version']}: export test accuracy {result['export_accuracy']:.4f}, trainer "
        f"{result['trainer_accuracy']:.4f} (difference {result['difference']:+.4f}) -> {verdict}")
    return {"validation": result, "exit_code": 0 if result["blessed"] else 1}


def cmd_push(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from deploy.push import push_export

    directory = RunLayout(run_dir).version_dir(config.export.name, args.version)
    written = push_export(directory, args.to, force=args.force)
    say(f"[push] {len(written)} files -> {args.to.rstrip('/')}/{os.path.basename(directory)}/")
    return {"pushed": written}


def cmd_serve(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from deploy.server import make_server

    server = make_server(run_dir, args.host, args.port, max_batch_size=args.max_batch_size,
                         batch_timeout_ms=args.batch_timeout_ms, batching=not args.no_batching,
                         max_request_bytes=int(args.max_request_mb * 2**20))
    models = {name: sorted(versions) for name, versions in server.registry.models.items()}
    say(f"[serve] http://{args.host}:{server.server_address[1]}/v1/models/<name> serving {models or 'nothing yet'}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return {}


def cmd_predict(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from deploy.predict import run_batch_prediction
    from kcp.core import contract as contract_lib
    from pipeline.sources import plan_source

    contract = contract_lib.read_contract(run_dir)
    directory = RunLayout(run_dir).version_dir(config.export.name, args.version)
    plan, records = plan_source(args.input, config.data)
    if plan.modality != contract.modality:
        raise UserError(f"--input: {args.input} holds {plan.modality}, the model takes {contract.modality}")
    say(f"[predict] {len(records)} inputs through {directory}")
    run_batch_prediction(directory, contract.class_names, plan, records, args.output, beam_args)
    say(f"[predict] -> {args.output}")
    return {}


def cmd_report(config, run_dir: str, beam_args: list[str], args=None) -> dict:
    from kcp.report import build_report

    path = build_report(run_dir)
    say(f"[report] {path}")
    return {"report": path}


def model_inputs_from_flags(args):
    """The ModelInputs of `describe-model`: from --run-dir's contract, or from the flags."""
    from trainer.models import ModelInputs

    if args.run_dir:
        from kcp.core import contract as contract_lib

        return ModelInputs.from_contract(contract_lib.read_contract(args.run_dir))
    if not args.input_shape or not args.num_classes:
        raise UserError("describe-model: give --input-shape and --num-classes, or --run-dir with a contract")
    try:
        shape = tuple(int(part) for part in args.input_shape.split(","))
    except ValueError:
        raise UserError(f"--input-shape: {args.input_shape!r} is not a comma-separated list of integers") from None
    modality = args.modality or {3: "image", 2: "sequence", 1: "text"}.get(len(shape))
    if modality is None:
        raise UserError(f"--input-shape: {args.input_shape!r} has {len(shape)} dimensions; expected 1, 2 or 3")
    return ModelInputs(modality=modality, shape=shape, num_classes=args.num_classes, vocab_size=args.vocab_size,
                       input_name=modality)


def cmd_describe_model(config, args) -> None:
    from trainer.models import build_model

    model = build_model(model_inputs_from_flags(args), config.model)
    model.summary(print_fn=lambda line, **_: say(line))
    say(f"Total params: {model.count_params()}")


COMMANDS = {"preprocess": cmd_preprocess, "train": cmd_train, "export": cmd_export, "run": cmd_run,
            "tune": cmd_tune, "validate": cmd_validate, "push": cmd_push, "serve": cmd_serve, "predict": cmd_predict,
            "report": cmd_report, "describe-model": None}


def main(argv: list[str] | None = None, *, lenient: bool = False) -> int:
    """Entry of `kcp` (strict flags) and of the stage modules (`lenient`: unknown flags warned)."""
    argv = list(sys_argv() if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    if lenient:
        args, unknown = parser.parse_known_args(argv)
    else:
        args, unknown = parser.parse_args(argv), []
    _configure_logging(args.verbose)
    if unknown:
        logging.getLogger("kcp").warning("ignoring flags this stage does not know: %s", " ".join(unknown))
    if beam_args and args.command not in ("preprocess", "run", "predict"):
        logging.getLogger("kcp").warning("ignoring Beam options after --: %s runs no Beam pipeline", args.command)
    try:
        from kcp.core import storage

        if args.command == "describe-model":  # reads a run's contract and config at most; writes nothing
            cmd_describe_model(resolve_config(args, args.run_dir), args)
            return 0
        run_dir = resolve_run_dir(args)
        config = resolve_config(args, run_dir)
        storage.makedirs(run_dir)
        storage.write_text_atomic(storage.join(run_dir, "config.yaml"), config.to_yaml())
        result = COMMANDS[args.command](config, run_dir, beam_args, args)
    except UserError as error:
        if args.verbose:
            traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"kcp {args.command}: error: {message}", file=sys.stderr)
        return 2
    return result.get("exit_code", 0) if isinstance(result, dict) else 0


if __name__ == "__main__":
    raise SystemExit(main())
