"""The `kcp` command line: one subcommand per stage, and `run` for all of them in order.

    kcp run                                   # the embedded digits, end to end
    kcp train --run-dir runs/r1 --set train.epochs=5

A thin layer over the Python API (kcp/api.py): parser.py is the table of commands and
flags, commands.py the handlers. A user error (bad key, missing file, unknown source)
prints one line and exits 2; `--verbose` adds the traceback. Beam options go after `--`.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import traceback

import trainer.models  # noqa: F401  registers the model families, whose keys the config loader validates
from kcp.cli.parser import COMMANDS, build_parser
from kcp.core.quiet import exit_at_once, filtered_stderr, write_failure_said_once
from kcp.core.config_load import resolve_config
from kcp.core.errors import UserError, write_failure
from kcp.core.cluster import is_cluster_helper
from kcp.core import storage
from kcp.core.layout import RunLayout, new_run_dir, newest_run
from kcp.core.remote import check_write_credentials, storage_failure

log = logging.getLogger("kcp")


def _configure_logging(verbose: bool) -> None:
    # TensorFlow's C++ INFO lines (oneDNN, CPU features) are not warnings; keep its warnings.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "1")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def missing_folders(path: str) -> list[str]:
    """The local folders of `path` that do not exist yet, innermost first (none on gs://)."""
    if storage.is_remote(path):
        return []
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def resolve_run_dir(args) -> str | None:
    """--run-dir; else a new timestamped run (preprocess, run) or the newest run with data."""
    if args.run_dir:
        return args.run_dir.rstrip("/") or args.run_dir
    if args.command == "describe-model":
        return None
    if args.command in ("preprocess", "run"):
        return new_run_dir()
    newest = newest_run()
    if newest is None:
        raise UserError("--run-dir: not given and no run under runs/ has data; run `kcp preprocess` first")
    log.info("using the newest run, %s", newest)
    return newest


# the commands that write into the run directory (serve, predict, push, versions, generate and
# describe-model only read it, which a public bucket allows without credentials)
WRITES_RUN_DIR = ("preprocess", "train", "tune", "export", "validate", "run", "report")


_UNFREED: list = []  # a write failure's error, with the frames and h5py objects it holds, never let go


def main(argv: list[str] | None = None, *, lenient: bool = False, console: bool | None = None) -> int:
    """Entry of `kcp` (strict flags) and of the `python -m STAGE.task` launchers (`lenient`:
    unknown flags are warned about and ignored). `console`: the process ends when this returns
    (the `kcp` script, which gives no `argv`, and the launchers' own entries), so a second Ctrl-C
    and a write failure may end it at once; not for callers in a process that goes on."""
    console = argv is None if console is None else console
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1:]
    parser = build_parser(abbreviations=not lenient)
    if lenient:
        args, unknown = parser.parse_known_args(argv)
    else:
        args, unknown = parser.parse_args(argv), []
    _configure_logging(args.verbose)
    if unknown:
        log.warning("ignoring flags this stage does not know: %s", " ".join(unknown))
    if beam_args and not COMMANDS[args.command].runs_beam:
        log.warning("ignoring Beam options after --: %s runs no Beam pipeline", args.command)
    run_dir, made = None, []
    with filtered_stderr(enabled=not args.verbose, hard_exit=console), write_failure_said_once() as said:
        try:
            made = missing_folders(args.run_dir) if args.run_dir else []  # the folders this command may make
            run_dir = resolve_run_dir(args)
            check_write_credentials([run_dir if args.command in WRITES_RUN_DIR else None,
                                     getattr(args, "output", None), getattr(args, "to", None)])
            if not args.run_dir and args.command in ("preprocess", "run"):
                made = [run_dir]
            config = resolve_config(run_dir, args.config, getattr(args, "source", None),
                                    getattr(args, "model", None), args.overrides)
            # Imported only now: the handlers bring Beam (about 3 s on 2 cores, measured), which
            # `kcp --help` and a bad flag or config key must not wait for; the stages that need
            # TensorFlow import it when they run (kcp/api.py).
            from kcp.cli.commands import HANDLERS

            return HANDLERS[args.command](args, run_dir, config, beam_args)
        except UserError as error:
            if args.verbose:
                traceback.print_exc()
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"kcp {args.command}: error: {message}", file=sys.stderr)
            return 2
        except Exception as error:  # noqa: BLE001  a storage service that refuses or cannot be reached: one line
            if _interrupt_inside(error):  # Ctrl-C inside a Beam job, which wraps it in a RuntimeError
                return _interrupted(args)
            remote = storage_failure(error)
            failure = f"{remote}; check the network and the credentials" if remote else write_failure(error)
            if failure is None:
                raise
            if not remote:  # a file this machine would not let the command write
                said.failed = True  # its finalizers' reports of the same failure are not shown
                if console:  # a file h5py could not write crashes the interpreter (139) when it is let go: kept
                    _UNFREED.append(error)  # until the end, which skips the finalizers
                    atexit.register(exit_at_once, code=2)
            if args.verbose:
                traceback.print_exc()
            print(f"kcp {args.command}: error: {failure}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever the work was
            return _interrupted(args)
        finally:  # a run directory made by a command that failed before writing anything is not left empty
            for folder in made:  # innermost first; one that holds anything stays, and so do those above it
                storage.remove_empty_folder(folder)


def _interrupt_inside(error: BaseException) -> bool:
    """True for a KeyboardInterrupt that Beam's runner re-raised as "RuntimeError: KeyboardInterrupt
    [while running 'Predict']" (or chained to another error)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt) or str(error).startswith("KeyboardInterrupt"):
            return True
        error = error.__cause__ or error.__context__
    return False


def _interrupted(args) -> int:
    """Ctrl-C: one line naming what a rerun does, exit 130 (the shell's code for SIGINT)."""
    if args.verbose:
        traceback.print_exc()
    rerun = {"train": "it resumes from the last checkpoint", "tune": "it resumes from the last checkpoint",
             "run": "training resumes from the last checkpoint",
             "predict": "it replaces what this one left under --output"}.get(args.command, "")
    print(f"kcp {args.command}: interrupted; run the same command again{f' ({rerun})' if rerun else ''}",
          file=sys.stderr)
    return 130


def launch_training(argv: list[str], stage: str = "train", console: bool = False) -> int:
    """`python -m trainer.task` (and `python -m tuning.task`, `stage` "tune"): the stage with a launcher's
    flags. With `AIP_MODEL_DIR` set (a Vertex AI job that registers a model), the chief then exports
    (`kcp export`; a search with `tune.retrain_best` has exported its best config) and validates
    (`kcp validate`) the serving SavedModel and, once it is blessed, copies it to the top of
    AIP_MODEL_DIR, saved_model.pb last, where Vertex AI's TensorFlow prediction containers look for
    it. An export that is not blessed is not handed over (exit 1), and a SavedModel handed over before
    is removed from there, since the trainer has put its new model.keras and metrics.json beside it."""
    code = main([stage, *argv], lenient=True, console=console)
    model_dir = os.environ.get("AIP_MODEL_DIR")
    if code or not model_dir:
        return code
    from deploy.export import copy_tree

    args, _ = build_parser(abbreviations=False).parse_known_args(["export", *argv])
    run_dir = resolve_run_dir(args)
    config = resolve_config(run_dir, args.config, overrides=args.overrides)
    if is_cluster_helper(config.train.strategy):  # the chief hands the model over
        return code
    if stage == "tune" and not config.tune.retrain_best:  # a search alone trains no final model to hand over
        print(f"[tune] AIP_MODEL_DIR {model_dir}: nothing handed over, since tune.retrain_best is false (set it "
              "true to retrain the best config and hand its export over)", flush=True)
        return 0
    for step in ("export", "validate") if stage == "train" else ("validate",):  # the newest version: this one
        code = main([step, *argv], lenient=True, console=console)
        if code:
            remove_saved_model(model_dir)
            return code
    remove_saved_model(model_dir)  # saved_model.pb first: never an old one beside new variables
    version_dir = RunLayout(run_dir).version_dir(config.export.name)
    copy_tree(version_dir, model_dir)
    print(f"[export] {version_dir} -> {model_dir} (AIP_MODEL_DIR)", flush=True)
    return 0


def remove_saved_model(folder: str) -> None:
    """Removes a SavedModel from `folder` (saved_model.pb first, so no reader takes a partial one),
    leaving the folder's other files."""

    storage.remove(storage.join(folder, "saved_model.pb"))
    for name in ("variables", "assets", "assets.extra"):
        storage.remove_tree(storage.join(folder, name))
    storage.remove(storage.join(folder, "fingerprint.pb"))
