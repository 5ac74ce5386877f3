"""The `kcp` command line as a table: each command's description, examples and flags.

Adding a command is one COMMANDS entry here and one handler in kcp/cli/commands.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

RUN_DIR_HELP = ("the run directory, local or gs:// (default: a new runs/<UTC timestamp> for preprocess and run; "
                "the newest run under runs/ otherwise)")

# flag groups: (names, argparse keyword arguments)
SOURCE = [(("--source",), dict(help="short for --set data.source=SOURCE (e.g. digits)"))]
MODEL = [(("--model",), dict(help="short for --set model.name=NAME"))]
VERSION = [(("--version",), dict(type=int, help="export version (default: the newest)"))]
PREDICT_VERSION = [(("--version",), dict(type=int, help="export version (default: the newest blessed one, as "
                                                        "kcp serve; the newest when none is blessed)"))]
TUNE = [
    (("--role",), dict(choices=("chief", "worker"), help="distributed search: this process's role")),
    (("--oracle",), dict(metavar="HOST:PORT", help="the chief's address (KERASTUNER_ORACLE_IP/PORT)")),
    (("--tuner-id",), dict(help="this worker's id (default: worker-<host>-<pid>)")),
]
def version_or_next(text: str):
    """--dest-version: a version number from 1, or "next"."""
    if text == "next":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a version number from 1, or next; got {text!r}")
    return int(text)


PUSH = [
    (("--to",), dict(required=True, metavar="gs://BUCKET/PATH", help="destination; VERSION is appended")),
    (("--force",), dict(action="store_true", help="push a version that is not blessed")),
    (("--dest-version",), dict(type=lambda text: version_or_next(text), metavar="N|next",
                               help="the version folder at the destination (default: the export's number; "
                                    "next: one above the highest there)")),
]
SERVE = [
    (("--host",), dict(default="127.0.0.1", help="address to bind (default 127.0.0.1)")),
    (("--port",), dict(type=int, default=8501)),
    (("--max-batch-size",), dict(type=int, default=32, help="rows per batched model call")),
    (("--batch-timeout-ms",), dict(type=float, default=2.0, help="wait for more rows this long")),
    (("--no-batching",), dict(action="store_true", help="one model call per request")),
    (("--max-request-mb",), dict(type=float, default=10.0, help="largest request body or gRPC message")),
    (("--grpc-port",), dict(type=int, default=8500, help="TF Serving's gRPC API (default 8500; 0 picks a free port)")),
    (("--no-grpc",), dict(action="store_true", help="REST only")),
    (("--version-policy",), dict(default="latest:1", metavar="POLICY",
                                 help="latest[:N] (default latest:1, as TF Serving), all, or specific:V1,V2")),
    (("--version-label",), dict(action="append", default=[], metavar="[NAME:]LABEL=VERSION",
                                help="serve VERSION as /v1/models/NAME/labels/LABEL (repeatable), e.g. stable=3 "
                                     "(every model under RUN/export/) or digits:stable=3 (model digits only)")),
    (("--allow-unvalidated",), dict(action="store_true",
                                    help="also serve versions kcp validate did not bless (TF Serving's behaviour)")),
    (("--poll-seconds",), dict(type=float, default=1.0, help="rescan the exports this often (0.1 or more)")),
    (("--max-connections",), dict(type=int, default=64, help="concurrent connections (REST) and calls (gRPC); "
                                                                "beyond: 503 / RESOURCE_EXHAUSTED")),
    (("--idle-timeout-s",), dict(type=float, default=30.0, help="close connections idle or stalled this long")),
]
PREDICT = [
    (("--input",), dict(required=True, metavar="SOURCE", help="a source URI, as for preprocess")),
    (("--output",), dict(required=True, metavar="PREFIX",
                         help="writes PREFIX-00000-of-000NN.jsonl shards (dead letters: PREFIX.dead_letter-*.jsonl)")),
    (("--single-file",), dict(action="store_true", help="write exactly one file, named --output")),
]
DESCRIBE = [
    (("--input-shape",), dict(help="one example's shape, e.g. 32,32,3 (image), 100,3 (sequence), 200 (text), "
                                   "256 (language: the context)")),
    (("--num-classes",), dict(type=int, help="number of classes (language: the vocabulary size)")),
    (("--modality",), dict(choices=("image", "sequence", "text", "language"),
                           help="default: from the rank of --input-shape (3: image, 2: sequence, 1: text)")),
    (("--vocab-size",), dict(type=int, default=0, help="text, language: vocabulary size including the reserved ids")),
]
GENERATE = [
    (("--prompt",), dict(help="the start of the text to complete (a new document)")),
    (("--prompt-file",), dict(metavar="PATH", help="read the prompt from a file (local or gs://) instead")),
    (("--max-new-tokens",), dict(type=int, default=None, help="tokens to add at most (default 64, or half the context "
                                                              "where that is shorter; the completion also ends "
                                                              "where the model ends the document)")),
    (("--temperature",), dict(type=float, default=0.8, help="0: greedy; higher: more random (default 0.8)")),
    (("--top-k",), dict(type=int, default=0, help="sample among the k most likely tokens (default 0: all)")),
    (("--top-p",), dict(type=float, default=1.0, help="nucleus sampling: the most likely tokens up to this "
                                                      "probability mass (default 1.0: all)")),
    (("--seed",), dict(type=int, default=0, help="same seed, same completion, here and from the served "
                                                 "generate signature (default 0)")),
]


@dataclass(frozen=True)
class Command:
    description: str
    examples: tuple
    flags: tuple = ()
    runs_beam: bool = False  # takes Beam pipeline options after `--`


COMMANDS = {
    "preprocess": Command(
        "Read a source with Apache Beam, split, analyze, and write TFRecords + RUN/data/metadata.json.",
        ("kcp preprocess --source digits --run-dir runs/digits",
         "kcp preprocess --run-dir runs/digits --set data.num_shards=4 -- --direct_num_workers=2"),
        (*SOURCE, *MODEL), runs_beam=True),
    "train": Command(
        "Train a model on RUN/data and write RUN/train/ (model.keras, metrics.json, history.json).",
        ("kcp train --run-dir runs/digits --set train.epochs=10 --set train.optimizer=momentum",),
        (*MODEL,)),
    "export": Command(
        "Export RUN/train/model.keras as a SavedModel in RUN/export/NAME/VERSION/.",
        ("kcp export --run-dir runs/digits --set export.name=digits",)),
    "run": Command(
        "preprocess, train and export in order, then reload the export and check its accuracy.",
        ("kcp run", "kcp run --run-dir runs/digits --model cnn --set train.epochs=20"),
        (*SOURCE, *MODEL), runs_beam=True),
    "tune": Command(
        "Keras Tuner search over the trainer's configs; writes RUN/tuning/ (trials.csv, best_config.yaml).",
        ("kcp tune --run-dir runs/digits --model resnet --set tune.algorithm=bayesian --set tune.max_trials=8",
         "kcp tune --run-dir gs://B/runs/r --role chief --oracle 10.0.0.2:8000   # and on each worker: --role worker"),
        (*MODEL, *TUNE)),
    "validate": Command(
        "Run the test split through the export from raw inputs; bless it or not (validation.json).",
        ("kcp validate --run-dir runs/digits --set export.min_accuracy=0.95",), (*VERSION,)),
    "push": Command(
        "Copy a blessed export version to gs:// with the google-cloud-storage client.",
        ("kcp push --run-dir runs/digits --to gs://BUCKET/models/digits",), (*VERSION, *PUSH)),
    "serve": Command(
        "Serve RUN/export/ over TF Serving's REST and gRPC APIs (predict, classify, metadata, status).",
        ("kcp serve --run-dir runs/digits --port 8501",
         "curl -s localhost:8501/v1/models/model:predict -d '{\"instances\": [{\"b64\": \"'$(base64 -w0 digit.png)'\"}]}'"),
        (*SERVE,)),
    "predict": Command(
        "Batch prediction with Beam RunInference over the export; writes JSON lines.",
        ("kcp predict --run-dir runs/digits --input folder:new_images --output predictions/part",
         "kcp predict --run-dir runs/reviews --input csv:new.csv --output predictions.jsonl --single-file"),
        (*PREDICT_VERSION, *PREDICT), runs_beam=True),
    "versions": Command(
        "List the run's export versions: blessed or not, test figure, and the one kcp serve answers with.",
        ("kcp versions --run-dir runs/digits",)),
    "report": Command(
        "Write RUN/report/index.html: curves, confusion matrix, mistakes, filters, attention, augmentation.",
        ("kcp report --run-dir runs/digits",)),
    "generate": Command(
        "Complete a prompt with a run's language model (gpt); prints the completion, as the served "
        "generate signature answers it for the same seed.",
        ("kcp generate --run-dir runs/lm --prompt 'def fibonacci(n):' --max-new-tokens 128 --temperature 0",
         "kcp generate --run-dir runs/lm --prompt-file prompt.txt --temperature 0.8 --top-k 40 --seed 7"),
        (*GENERATE,)),
    "describe-model": Command(
        "Print a model's config (with the defaults applied), layers and parameter count for an input spec "
        "or a run's contract.",
        ("kcp describe-model --model resnet --set model.depth=56 --input-shape 32,32,3 --num-classes 10",
         "kcp describe-model --model transformer --input-shape 100 --modality text --vocab-size 20000 --num-classes 2",
         "kcp describe-model --model gpt --input-shape 256 --modality language --vocab-size 259",
         "kcp describe-model --run-dir runs/digits"),
        (*MODEL, *DESCRIBE)),
}


def build_parser(abbreviations: bool = True) -> argparse.ArgumentParser:
    """The `kcp` parser; without `abbreviations` (the launchers' lenient parsing) a flag is taken only
    by its whole name, so a launcher's `--mode` is ignored, not read as `--model`."""
    parser = argparse.ArgumentParser(
        prog="kcp", description="keras-cloud-pipeline: raw data to a served Keras model.",
        epilog="example:\n  kcp run", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=abbreviations)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name, help=command.description, description=command.description,
            epilog="examples:\n" + "\n".join(f"  {line}" for line in command.examples),
            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=abbreviations)
        sub.add_argument("--run-dir", "--job-dir", dest="run_dir", metavar="RUN", help=RUN_DIR_HELP)
        sub.add_argument("--config", metavar="FILE", help="a YAML file with sections data, model, train, tune, export")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value (YAML syntax); repeatable")
        sub.add_argument("--verbose", action="store_true", help="debug logging and tracebacks")
        for names, options in command.flags:
            sub.add_argument(*names, **options)
    return parser
