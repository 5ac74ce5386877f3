"""The `kcp` command handlers: each calls the Python API (kcp/api.py) and prints what it did.

A handler takes the parsed flags, the run directory, the config the flags resolve to and
the Beam options after `--`, and returns the exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time

from kcp import api
from kcp.cli.figures import document_cache_figures, language_verdict, version_line
from kcp.core import quiet, storage
from kcp.core.char_ngrams import char_ngram_count
from kcp.core.cluster import take_tuner_role, tuner_id
from kcp.core.config import DEFAULT_DROPOUT
from kcp.core.contract import read_contract
from kcp.core.errors import UserError
from kcp.core.layout import SPLITS, RunLayout
from trainer.models import ModelInputs, build_model


def say(text: str) -> None:
    print(text, flush=True)


def counted(count: int, noun: str) -> str:  # "1 epoch", "30 epochs"
    return f"{count} {noun}{'' if count == 1 else 's'}"


def config_inputs(args) -> dict:
    """The configuration flags as the API's keyword arguments."""
    return {"config_file": args.config, "overrides": args.overrides}


def preprocess(args, run_dir: str, config, beam_args: list[str]) -> int:
    _preprocess(args, run_dir, config, beam_args)
    return 0


def _preprocess(args, run_dir: str, config, beam_args: list[str]):
    say(f"[preprocess] {config.data.source} -> {run_dir}/data")
    contract = api.preprocess(run_dir, args.source, model=getattr(args, "model", None), beam_args=beam_args,
                              **config_inputs(args), progress=lambda line: say(f"[preprocess] {line}"))
    if contract.bad_examples:
        say(f"[preprocess] {counted(contract.bad_examples, 'bad input')}: reasons in {run_dir}/data/dead_letter/")
    return contract


def train(args, run_dir: str, config, beam_args: list[str]) -> int:
    _train(args, run_dir, config)
    return 0


def _train(args, run_dir: str, config) -> dict:
    say(f"[train] {config.model.name}, {counted(config.train.epochs, 'epoch')}, batch {config.train.batch_size}, "
        f"{config.train.optimizer} lr {config.train.learning_rate:g}")
    metrics = (result := api.train(run_dir, args.model, **config_inputs(args))).metrics
    test = metrics.get("test", {})
    if "bits_per_byte" in test or "tokens_per_second" in metrics:
        perplexity = test.get("perplexity", float("nan"))
        figure = (f"test {test['bits_per_byte']:.4f} bits per byte (perplexity {perplexity:.2f} per token)"
                  if "bits_per_byte" in test else "no test figure: the test split got no documents (add documents)")
        say(f"[train] {figure}, {metrics['tokens_per_second']:.0f} tokens/s, {metrics['wall_seconds']:.1f} s "
            f"-> {result.train_dir}")
        cache = document_cache_figures(metrics)
        if cache:
            say(f"[train] test documents {cache}")
        return metrics
    say(f"[train] test accuracy {test.get('accuracy', float('nan')):.4f}, "
        f"{metrics['examples_per_second']:.0f} examples/s, {metrics['wall_seconds']:.1f} s -> {result.train_dir}")
    return metrics


def export(args, run_dir: str, config, beam_args: list[str]) -> int:
    _export(args, run_dir)
    return 0


def _export(args, run_dir: str) -> str:
    export_dir = api.export(run_dir, **config_inputs(args))
    say(f"[export] SavedModel -> {export_dir}")
    return export_dir


def run(args, run_dir: str, config, beam_args: list[str]) -> int:
    """preprocess, train, export, validate (a matching export blessed; exit 1 if not, as kcp validate), report."""
    started = time.perf_counter()
    with api.locked(run_dir, "run"):  # one lock over the three stages
        contract = _preprocess(args, run_dir, config, beam_args)
        metrics = _train(args, run_dir, config)
        export_dir = _export(args, run_dir)
    if contract.modality == "language":
        blessed = _run_language_summary(run_dir, started, contract, metrics, export_dir)
        return report(args, run_dir, config, []) or (0 if blessed else 1)
    split = "test" if "test" in metrics else next((s for s in ("validation", "train") if s in metrics), None)
    trainer_accuracy = metrics[split]["accuracy"] if split else float("nan")
    verdict, blessed = "", True
    if split == "test":  # validate the export as `kcp validate` does, so `kcp serve` serves it
        validation = api.validate(run_dir)
        reloaded = validation["export_accuracy"]
        blessed = validation["blessed"]
        verdict = " -> blessed" if blessed else " -> NOT blessed: " + "; ".join(validation["reasons"])
    else:
        reloaded = api.reloaded_accuracy(export_dir, run_dir, split) if split else float("nan")
    say("")
    say(f"kcp run: done in {time.perf_counter() - started:.0f} s — {run_dir}")
    say(f"  data      {contract.source}: " + ", ".join(f"{s} {i.count}" for s, i in contract.splits.items())
        + f" examples; {contract.bad_examples} bad")
    say(f"  model     {metrics['model']}, {metrics['params']:,} parameters, {counted(metrics['epochs'], 'epoch')}, "
        f"{metrics['examples_per_second']:.0f} examples/s")
    say("  accuracy  " + " · ".join(f"{split} {metrics[split]['accuracy']:.4f}" for split in SPLITS if split in metrics))
    say(f"  export    {export_dir}")
    say(f"  reloaded  export {split or 'no split'} accuracy {reloaded:.4f} (trainer {trainer_accuracy:.4f}, "
        f"difference {abs(reloaded - trainer_accuracy):.4f})"
        + (verdict if split == "test" else "; the test split is empty"))
    return report(args, run_dir, config, []) or (0 if blessed else 1)


def _run_language_summary(run_dir: str, started: float, contract, metrics: dict, export_dir: str) -> bool:
    """`kcp run`'s closing lines for a language model: bits per byte, the export validated (False: unblessed)."""
    verdict, validation = "the test split is empty: not validated", {"blessed": True}
    if "test" in metrics:
        validation = api.validate(run_dir)
        verdict = language_verdict(validation)
    statistics = contract.statistics
    say("")
    say(f"kcp run: done in {time.perf_counter() - started:.0f} s — {run_dir}")
    say(f"  data      {contract.source}: " + ", ".join(
        f"{split} {statistics['tokens'][split]:,} tokens" for split in SPLITS if split in statistics.get("tokens", {}))
        + f" ({statistics['tokenizer']}, context {statistics['context_length']}); {contract.bad_examples} bad")
    say(f"  model     {metrics['model']}, {metrics['params']:,} parameters, {counted(metrics['epochs'], 'epoch')}, "
        f"{metrics['tokens_per_second']:.0f} tokens/s")
    say("  bits/byte " + " · ".join(f"{split} {metrics[split]['bits_per_byte']:.4f}" for split in SPLITS
                                    if split in metrics))
    cache = document_cache_figures(metrics)
    if cache:
        say(f"  documents {cache}")
    say(f"  export    {export_dir}")
    say(f"  reloaded  {verdict}")
    return validation["blessed"]


def tune(args, run_dir: str, config, beam_args: list[str]) -> int:
    take_tuner_role(args.role, args.oracle, args.tuner_id)  # or the roles of a TF_CONFIG cluster
    role = tuner_id()
    # hyperband's brackets, from train.epochs (its max_epochs) and factor 3, set its trial count, not max_trials
    from tuning.space import planned_trials

    size = (f", brackets of up to {counted(config.train.epochs, 'epoch')} a trial (hyperband's factor 3; "
            "train.epochs, not tune.max_trials, sets how many trials)" if config.tune.algorithm == "hyperband"
            else f", {counted(planned_trials(config), 'trial')}")
    if role:  # the chief's oracle runs the search; a worker takes the trials it is given
        oracle = f"{os.environ.get('KERASTUNER_ORACLE_IP')}:{os.environ.get('KERASTUNER_ORACLE_PORT')}"
        size = f" as {role} of {oracle}" + (size if role == "chief" else " (the chief sets the trials)")
    say(f"[tune] {config.tune.algorithm} over {config.model.name}{size}")
    result = api.tune(run_dir, args.model, **config_inputs(args))
    summary = result.summary
    if summary.get("best_trial") is not None:
        say(f"[tune] best trial {summary['best_trial']}: {summary['objective']} {summary['best_score']:.4f} "
            f"{json.dumps(summary['hyperparameters'])} -> {run_dir}/tuning/best_config.yaml")
    if result.export_dir and result.retrained is None:
        say(f"[tune] the search was complete and best trial {summary['best_trial']} was already retrained and "
            f"exported to {result.export_dir}; not retrained again (delete {run_dir}/tuning/retrained.json to retrain)")
    elif result.export_dir:
        say(f"[tune] retrained the best config on train + validation, exported to {result.export_dir}")
    return 0


def validate(args, run_dir: str, config, beam_args: list[str]) -> int:
    result = api.validate(run_dir, args.version, overrides=args.overrides)
    if "lost_blessing" in result:  # validated again, stricter: the version a server used is not served now
        now = result["lost_blessing"]
        say(f"[validate] version {result['version']} was blessed before and is not now: kcp serve and kcp predict "
            + (f"use version {now}" if now else "have no blessed version of this model to use"))
    if result.get("modality") == "language":
        say(f"[validate] version {result['version']}: {language_verdict(result)}")
        return 0 if result["blessed"] else 1
    verdict = "blessed" if result["blessed"] else "NOT blessed: " + "; ".join(result["reasons"])
    say(f"[validate] version {result['version']}: export test accuracy {result['export_accuracy']:.4f}, trainer "
        f"{result['trainer_accuracy']:.4f} (difference {round(result['difference'], 4) + 0.0:+.4f}) -> {verdict}")
    return 0 if result["blessed"] else 1


def push(args, run_dir: str, config, beam_args: list[str]) -> int:
    written = api.push(run_dir, args.to, args.version, force=args.force, dest_version=args.dest_version,
                       overrides=args.overrides)
    source = RunLayout(run_dir).version_dir(config.export.name, args.version)  # what was pushed, and where to
    say(f"[push] {source}: {len(written)} files -> {written[-1].rsplit('/', 1)[0]}/")  # saved_model.pb, last
    return 0


def serve(args, run_dir: str, config, beam_args: list[str]) -> int:
    server = api.serve(run_dir, args.host, args.port, max_batch_size=args.max_batch_size,
                       batch_timeout_ms=args.batch_timeout_ms, batching=not args.no_batching,
                       max_request_bytes=args.max_request_mb * 2**20, max_connections=args.max_connections,
                       idle_timeout_s=args.idle_timeout_s, version_policy=args.version_policy,
                       allow_unvalidated=args.allow_unvalidated, version_labels=args.version_label,
                       poll_seconds=args.poll_seconds, grpc_port=None if args.no_grpc else args.grpc_port)
    registry, grpc = server.registry, f", gRPC {args.host}:{server.grpc.port}" if server.grpc else ""
    say(f"[serve] http://{args.host}:{server.server_address[1]}/v1/models/<name>{grpc} "
        f"serving {registry.served() or 'nothing yet'}")
    for name, versions in sorted(registry.unblessed.items()):
        if versions:
            say(f"[serve] {name}: versions {sorted(versions)} not blessed by kcp validate, not served "
                "(--allow-unvalidated serves them)")
    for name, failures in sorted(registry.failures.items()):
        for version, failure in sorted(failures.items()):
            say(f"[serve] {name}: version {version} failed to load: {failure.error}")
    import signal  # here: only this handler (in the main thread) installs signal handlers
    received: list[int] = []

    def stop(signum, _frame):  # Ctrl-C and SIGTERM alike: no new requests, those in progress finish
        if received:  # a second signal: stop at once, without waiting for the model calls still running
            print(f"kcp serve: {signal.Signals(signum).name} again: stopped at once", file=sys.stderr, flush=True)
            quiet.drain()  # the line, through the stderr filter's thread
            os._exit(128 + signum)
        received.append(signum)
        server.request_stop()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not received:
        return 0
    name = signal.Signals(received[0]).name
    print(f"kcp serve: {name}: stopped; requests in progress were given {server.stop_grace_s:g} s to finish",
          file=sys.stderr)
    return 128 + received[0]  # the shell's code for death by that signal: 130 (SIGINT), 143 (SIGTERM)


def predict(args, run_dir: str, config, beam_args: list[str]) -> int:
    files = api.predict(run_dir, args.input, args.output, args.version, beam_args=beam_args,
                        overrides=args.overrides, single_file=args.single_file,
                        progress=lambda line: say(f"[predict] {line}"))
    say(f"[predict] -> {files[0] if len(files) == 1 else f'{len(files)} files, {files[0]} ...'}")
    return 0


def report(args, run_dir: str, config, beam_args: list[str]) -> int:
    say(f"[report] {api.report(run_dir).path}")
    return 0


def versions(args, run_dir: str, config, beam_args: list[str]) -> int:
    rows = api.versions(run_dir)
    if not rows:
        raise UserError(f"{RunLayout(run_dir).exports}: no export versions; run `kcp export --run-dir {run_dir}`")
    for row in rows:
        say(version_line(row))
    return 0


def generate(args, run_dir: str, config, beam_args: list[str]) -> int:
    """Prints the completion only (stdout), so that it pipes."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("generate: give one of --prompt TEXT or --prompt-file PATH")
    if args.prompt_file is not None:
        if not storage.exists(args.prompt_file):
            raise UserError(f"--prompt-file: {args.prompt_file} not found")
        try:
            prompt = storage.read_text(args.prompt_file)
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file: {args.prompt_file} is not UTF-8 text") from None
    else:
        prompt = args.prompt
    completion = api.generate(run_dir, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    sys.stdout.write(completion + "\n")
    sys.stdout.flush()
    return 0


DESCRIBED_CHARACTERS_PER_TOKEN = 5  # describe-model of text from flags: data.max_characters null -> 5 a token


def model_inputs_from_flags(args, config) -> ModelInputs:
    """The ModelInputs of `describe-model`: from --run-dir's contract, or from the flags (text: with
    `data.char_ngrams` n-grams of `data.max_characters`, or of 5 characters a token when it is null)."""
    if args.run_dir:
        return ModelInputs.from_contract(read_contract(args.run_dir))
    if args.modality == "language":  # next-token classes: one per vocabulary id
        if not args.input_shape or not args.vocab_size:
            raise UserError("describe-model: a language model needs --input-shape CONTEXT and --vocab-size")
        return ModelInputs(modality="language", shape=(int(args.input_shape),), num_classes=args.vocab_size,
                           vocab_size=args.vocab_size, input_name="tokens")
    if not args.input_shape or not args.num_classes:
        raise UserError("describe-model: give --input-shape and --num-classes, or --run-dir with a contract")
    try:
        shape = tuple(int(part) for part in args.input_shape.split(","))
    except ValueError:
        raise UserError(f"--input-shape: {args.input_shape!r} is not a comma-separated list of integers") from None
    modality = args.modality or {3: "image", 2: "sequence", 1: "text"}.get(len(shape))
    if modality is None:
        raise UserError(f"--input-shape: {args.input_shape!r} has {len(shape)} dimensions; expected 1, 2 or 3")
    grams = {}
    if modality == "text" and config.data.char_ngrams:
        characters = config.data.max_characters or DESCRIBED_CHARACTERS_PER_TOKEN * shape[0]
        grams = {"char_ngram_length": char_ngram_count(config.data.char_ngrams, characters),
                 "char_ngram_buckets": config.data.char_ngram_buckets}
    return ModelInputs(modality=modality, shape=shape, num_classes=args.num_classes, vocab_size=args.vocab_size,
                       input_name=modality, **grams)


def describe_model(args, run_dir: str | None, config, beam_args: list[str]) -> int:
    """The model section with every default applied, then the Keras summary; writes nothing. A key
    whose default depends on the data (resnet's `model.width: 0`) also shows what it comes to here."""
    spec = model_inputs_from_flags(args, config)
    applied = dict(config.model.family.applied(spec)) if hasattr(config.model.family, "applied") else {}
    if config.model.dropout is None:  # the shared key: what null comes to (the resnet's depends on the data)
        applied.setdefault("dropout", DEFAULT_DROPOUT)
    else:
        applied.pop("dropout", None)
    if spec.modality == "image" and config.model.augment.translation is None:
        applied["augment"] = {**config.to_dict()["model"]["augment"],
                              "translation": config.model.augment.applied_translation(spec.modality, spec.shape)}
    say("model:")
    for key, value in config.to_dict()["model"].items():
        resolved = f" (applied: {json.dumps(applied[key])})" if applied.get(key, value) != value else ""
        say(f"  {key}: {json.dumps(value)}{resolved}")
    family_defaults = config.model.family.training_defaults if hasattr(config.model.family, "training_defaults") \
        else {}
    if family_defaults:  # the training keys this family sets its own defaults for, as applied
        plain = config.to_dict()
        say(f"training defaults of {config.model.name} (as applied):")
        for section, names in family_defaults.items():
            for name, default in names.items():  # a key the user set says so, beside the family's default
                chosen = f" (set; {config.model.name}'s default: {json.dumps(default)})" \
                    if plain[section][name] != default else ""
                say(f"  {section}.{name}: {json.dumps(plain[section][name])}{chosen}")
    model = build_model(spec, config.model)
    model.summary(print_fn=lambda line, **_: say(line))
    say(f"Total params: {model.count_params()}")
    return 0


HANDLERS = {"preprocess": preprocess, "train": train, "export": export, "run": run, "tune": tune,
            "validate": validate, "push": push, "serve": serve, "predict": predict, "report": report,
            "generate": generate, "describe-model": describe_model, "versions": versions}
