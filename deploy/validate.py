"""Validation before push: run a split through the export's serving signature from raw inputs.

    kcp validate --run-dir runs/digits [--version N]

The test split goes in as a client would send it (PNG bytes for images, strings for text,
floats for sequences); the export's accuracy must match the trainer's test accuracy within
0.5 percentage points and reach `export.min_accuracy` when set. The figures and the verdict
go to RUN/export/NAME/VERSION/assets.extra/validation.json, which travels with the model.

A language export (`validate_language`) is fed test texts: its `score` must equal the
log-probabilities of the trained Keras model (model.keras, computed here in Python from the
contract's own encoder), both the network's alone and mixed with the document cache by the
weights the trainer fitted (kcp/core/document_cache.py's NumPy reference), within
LOG_PROBABILITY_TOLERANCE, its greedy `generate` (temperature 0)
must be a greedy decoding of that model (at every new token, the export's id is the Keras
model's argmax up to GREEDY_TIE nats: an independent, uncached reference for the cache), and
its bits per byte on the texts must not be worse than the newest blessed version's below it (made
with the same data contract) on the same texts by more than MAX_REGRESSION_BITS (lower is better;
export.max_regression null: no comparison). A classifier's accuracy, likewise, must not be below
that version's by more than export.max_regression.
"""

from __future__ import annotations

import json
import os

import numpy as np

import tensorflow as tf

from deploy.export import FINGERPRINT, client_inputs, serving_input_name
from deploy.saved_model import ExportUnreadable, load_export
from kcp.core import storage
from kcp.core.config import Config
from kcp.core.errors import UserError
from kcp.core import contract as contract_lib
from kcp.core import document_cache
from kcp.core import examples as example_lib
from kcp.core.layout import (RunLayout, export_versions, is_blessed, validation_record,
                             version_files_sha256)

MAX_DIFFERENCE = 0.005


def predict_split(export, run_dir: str, split: str = "test", batch_size: int = 256) -> dict:
    """Predicts a split from client inputs with an export (its directory, loaded with
    `tf.saved_model.load`, or what that gave).

    Returns {"keys", "labels", "class_ids", "probabilities"} as NumPy arrays in shard order.
    """
    contract = contract_lib.read_contract(run_dir)
    serve = (load_export(export) if isinstance(export, str) else export).signatures["serving_default"]
    name = serving_input_name(contract)
    keys, labels, class_ids, probabilities = [], [], [], []
    for inputs, batch_labels, batch_keys in example_lib.read_split(contract, contract_lib.data_dir(run_dir), split,
                                                                     batch_size):
        raw = client_inputs(contract, inputs.numpy())
        outputs = serve(**{name: tf.constant(raw)})
        keys.append(batch_keys.numpy())
        labels.append(batch_labels.numpy())
        class_ids.append(outputs["class_ids"].numpy())
        probabilities.append(outputs["probabilities"].numpy())
    return {
        "keys": np.concatenate(keys),
        "labels": np.concatenate(labels),
        "class_ids": np.concatenate(class_ids),
        "probabilities": np.concatenate(probabilities),
    }


def export_accuracy(export, run_dir: str, split: str = "test") -> float:
    """Accuracy of the reloaded export (a directory or a loaded one) on a split, fed the raw inputs a
    client would send."""
    predictions = predict_split(export, run_dir, split)
    return float(np.mean(predictions["class_ids"] == predictions["labels"]))


def validate_export(config: Config, run_dir: str, version: int | None = None) -> dict:
    """Validates one export version; writes and returns its validation.json content."""
    layout = RunLayout(run_dir)
    directory = layout.version_dir(config.export.name, version)
    metrics_path = layout.metrics
    if not storage.exists(metrics_path):
        raise UserError(f"{metrics_path}: not found; validation compares with the trainer's test metrics")
    metrics = json.loads(storage.read_text(metrics_path))
    contract = contract_lib.read_contract(run_dir)
    test = contract.splits.get("test")
    if not test or not test.count or "test" not in metrics:
        fix = ("a corpus's documents go whole to one split, so give it more files (data.split then puts some in "
               "test), or serve without validation (kcp serve --allow-unvalidated)" if contract.modality == "language"
               else "give data.split a test fraction (or the source a test split) and preprocess again")
        raise UserError(f"{run_dir}: the test split is empty, so there is nothing to validate the export on; {fix}")
    fingerprint = read_fingerprint(directory)
    exported = fingerprint.get("weights_sha256")
    if metrics.get("weights_sha256") and exported and exported != metrics["weights_sha256"]:
        raise UserError(f"{directory} was exported from another model than {metrics_path} describes "
                        f"(trained again since); run `kcp export --run-dir {run_dir}` and validate the new version")
    # scored on another contract's test split (preprocessed again, other data), a good export would
    # lose its blessing: refused before validation.json is touched
    if fingerprint.get("contract_sha256") and fingerprint["contract_sha256"] != storage.sha256(layout.metadata):
        raise UserError(f"{directory} was exported with another data contract than {layout.metadata} (preprocessed "
                        f"again since), so its test split is not the model's; run `kcp train` and `kcp export` "
                        f"(--run-dir {run_dir}) first, and validate the new version")
    digests = version_files_sha256(directory)  # before loading: what is validated is what push and predict check
    try:
        loaded = load_export(directory)
    except ExportUnreadable as error:  # a damaged export: its blessing, if any, is withdrawn
        storage.write_text_atomic(validation_record(directory), json.dumps(
            {"version": version_number(directory), "blessed": False, "reasons": [str(error)]}, indent=2) + "\n")
        raise
    if contract.modality == "language":
        result = {**validate_language(contract, run_dir, directory, metrics, config.export.name, loaded,
                                      compare=config.export.max_regression is not None), "files_sha256": digests}
        storage.write_text_atomic(validation_record(directory),
                                  json.dumps(result, indent=2) + "\n")
        return result
    trainer = metrics["test"]["accuracy"]
    accuracy = export_accuracy(loaded, run_dir, "test")
    reasons = []
    if abs(accuracy - trainer) > MAX_DIFFERENCE:
        reasons.append(f"export accuracy {accuracy:.4f} differs from the trainer's {trainer:.4f} by more than "
                       f"{MAX_DIFFERENCE:.3f}")
    if config.export.min_accuracy is not None and accuracy < config.export.min_accuracy:
        reasons.append(f"export accuracy {accuracy:.4f} is below export.min_accuracy {config.export.min_accuracy}")
    baseline = baseline_accuracy(directory, run_dir, config) if config.export.max_regression is not None else {}
    if baseline.get("accuracy") is not None and accuracy < baseline["accuracy"] - config.export.max_regression:
        reasons.append(f"export accuracy {accuracy:.4f} is below blessed version {baseline['version']}'s "
                       f"{baseline['accuracy']:.4f} on the same test split by more than export.max_regression "
                       f"{config.export.max_regression}")
    result = {
        "version": version_number(directory),
        "export_accuracy": accuracy,
        "trainer_accuracy": trainer,
        "difference": accuracy - trainer,
        "max_difference": MAX_DIFFERENCE,
        "min_accuracy": config.export.min_accuracy,
        "examples": test.count,
        "baseline_version": baseline.get("version"),
        "baseline_accuracy": baseline.get("accuracy"),
        "max_regression": config.export.max_regression,
        "blessed": not reasons,
        "reasons": reasons,
        "files_sha256": digests,
    }
    storage.write_text_atomic(validation_record(directory),
                              json.dumps(result, indent=2) + "\n")
    return result


def baseline_accuracy(directory: str, run_dir: str, config: Config) -> dict:
    """{"version", "accuracy"} of the newest other blessed version on this contract's test split, as
    a client sends it; {} when there is none, or {"version", "accuracy": None, "error"} when it cannot
    take these inputs (made for other data): then no comparison is made, and validation.json says why."""
    baseline_dir = blessed_baseline(RunLayout(run_dir).export_root(config.export.name), version_number(directory),
                                    storage.sha256(RunLayout(run_dir).metadata))
    if baseline_dir is None:
        return {}
    try:
        return {"version": version_number(baseline_dir), "accuracy": export_accuracy(baseline_dir, run_dir, "test")}
    except (UserError, ValueError, TypeError, tf.errors.OpError) as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        return {"version": version_number(baseline_dir), "accuracy": None, "error": first[:300]}


# --- language ----------------------------------------------------------------------------

LOG_PROBABILITY_TOLERANCE = 1e-3  # nats per text, plus 1e-5 of its magnitude (float32 sums)
GREEDY_TIE = 1e-4  # nats: an export id this close to the Keras model's best logit is a tie, not an error
MAX_REGRESSION_BITS = 0.01  # bits per byte a new version may lose against the blessed one (noise)
VALIDATION_TEXTS = 64
GENERATION_PROMPTS, GENERATION_TOKENS = 3, 16


def version_number(directory: str) -> int:
    return int(directory.rstrip("/").replace(os.sep, "/").rsplit("/", 1)[-1])


def export_scores(export, texts: list[str], batch_size: int = 16, with_network: bool = False) -> tuple:
    """(log_probability, tokens) of the export's `score` signature for the texts, fed as a client
    would, and with `with_network` its network_log_probability third; `export` is a version's
    directory or what tf.saved_model.load made of it."""
    score = (load_export(export) if isinstance(export, str) else export).signatures["score"]
    names = ("log_probability", "tokens") + (("network_log_probability",) if with_network else ())
    columns = {name: [] for name in names}
    for start in range(0, len(texts), batch_size):
        outputs = score(texts=tf.constant([text.encode("utf-8") for text in texts[start:start + batch_size]]))
        for name in names:
            columns[name].append(outputs[name].numpy())
    return tuple(np.concatenate(columns[name]) for name in names)


def keras_log_probabilities(scorer, ids: list[int], cache_weights) -> tuple[float, float]:
    """(mixed, network): the natural log-probability the Keras model gives `ids` followed by the
    separator, after a separator, in windows of the context (`scorer`, a document_cache.WindowScorer),
    mixed with the text's document cache by `cache_weights`, and the network's alone (as the
    export's `score` computes them, but per text, from model.keras, with the cache counted by
    kcp/core/document_cache.py's NumPy reference)."""
    sequence = [contract_lib.LANGUAGE_SEPARATOR, *ids, contract_lib.LANGUAGE_SEPARATOR]
    network = scorer(sequence)
    mixed = document_cache.mixed_log_probabilities(network, document_cache.document_caches(sequence), cache_weights)
    return float(mixed.sum()), float(network.sum())


def greedy_reference(model, prompt_ids: list[int], count: int) -> tuple[list[int], bool]:
    """Greedy decoding of the Keras model after `prompt_ids`: up to `count` new ids, ending at the
    first separator (dropped). Runs the whole model on the prefix at every step: no cache, an
    independent reference for the export's cached loop. Also says whether a step had a near tie
    (the two best logits within GREEDY_TIE), where float noise may pick either."""
    sequence, new, tie = list(prompt_ids), [], False
    for _ in range(count):
        logits = np.asarray(model(np.asarray([sequence], np.int32), training=False))[0, -1]
        best = int(logits.argmax())
        tie = tie or bool(np.sort(logits)[-2] > logits[best] - GREEDY_TIE)
        if best == contract_lib.LANGUAGE_SEPARATOR:
            break
        new.append(best)
        sequence.append(best)
    return new, tie


def read_fingerprint(version_dir: str) -> dict:
    """VERSION/assets.extra/kcp_fingerprint.json ({} when absent), read with TensorFlow's file system,
    like the rest of the export (on gs://, TensorFlow's client wrote it)."""
    path = storage.join(version_dir, "assets.extra", FINGERPRINT)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path, "rb") as handle:
        return json.loads(handle.read())


def blessed_baseline(export_root: str, version: int, contract_sha256: str | None = None) -> str | None:
    """The newest version below `version` that kcp validate blessed and that was exported with the
    same data contract (another contract's model may have trained on this test split), or None."""
    for other in reversed(export_versions(export_root)):
        directory = storage.join(export_root, str(other))
        if other < version and is_blessed(directory) and (
                contract_sha256 is None or read_fingerprint(directory).get("contract_sha256") == contract_sha256):
            return directory
    return None


def text_bits_per_byte(log_probabilities: np.ndarray, texts: list[str]) -> float:
    """Bits per byte of texts from their log-probabilities: each text's UTF-8 bytes plus one for its end."""
    return float(-np.sum(log_probabilities) / np.log(2) / sum(len(text.encode("utf-8")) + 1 for text in texts))


def validate_language(contract, run_dir: str, directory: str, metrics: dict, name: str, export,
                      compare: bool = True) -> dict:
    """Validates a language export (`export`: the loaded `directory`) on the test split's texts;
    returns validation.json's content.
    `compare` (export.max_regression not null): against the blessed baseline's bits per byte too."""
    import keras

    from deploy.language import language_texts

    texts = language_texts(contract, run_dir, "test", VALIDATION_TEXTS)
    if not texts:
        raise UserError(f"{run_dir}: the test split holds no text of 8 tokens or more to validate the export on")
    tokenizer, vocabulary = contract_lib.language_tokenizer(contract), contract_lib.language_vocabulary(run_dir, contract)
    context = int(contract.statistics["context_length"])
    model = keras.saving.load_model(RunLayout(run_dir).model, compile=False)
    exported, tokens, exported_network = export_scores(export, texts, with_network=True)
    encoded = [contract_lib.encode_language(text, tokenizer, vocabulary) for text in texts]
    cache_weights = document_cache.trained_weights(metrics)
    scorer = document_cache.WindowScorer(model, context)
    trainer, trainer_network = np.array([keras_log_probabilities(scorer, ids, cache_weights)
                                         for ids in encoded]).T
    reasons = []
    if not np.array_equal(tokens, [len(ids) + 1 for ids in encoded]):
        reasons.append("the export's score counts other tokens than the contract's encoder gives")
    difference = np.zeros(len(texts))
    for what, ours, theirs in (("log-probability", exported, trainer),
                               ("network log-probability", exported_network, trainer_network)):
        gap = np.abs(ours - theirs)
        difference = np.maximum(difference, gap)
        allowed = LOG_PROBABILITY_TOLERANCE + 1e-5 * np.abs(theirs)
        worst = int(np.argmax(gap - allowed))
        if gap[worst] > allowed[worst]:
            reasons.append(f"export {what} {ours[worst]:.4f} of test text {worst + 1} differs from the "
                           f"trained model's {theirs[worst]:.4f} by {gap[worst]:.2e} nats")
    generate = export.signatures["generate"]
    new_tokens = min(GENERATION_TOKENS, context - 1)  # a context of 16 or less leaves room for fewer
    prompts = [text[:max(1, len(text) // 4)] for text in texts[:GENERATION_PROMPTS]]
    completions = generate(prompts=tf.constant([prompt.encode("utf-8") for prompt in prompts]),
                           **{key: tf.constant(value, generate.structured_input_signature[1][key].dtype)
                              for key, value in {**contract_lib.GENERATE_DEFAULTS, "max_new_tokens": new_tokens,
                                                 "temperature": 0.0}.items()})["completions"].numpy()
    for prompt, completion in zip(prompts, completions):
        prompt_ids = [contract_lib.LANGUAGE_SEPARATOR, *contract_lib.encode_language(prompt, tokenizer, vocabulary)]
        reference, tie = greedy_reference(model, prompt_ids[-(context - new_tokens):], new_tokens)
        expected = contract_lib.decode_language(reference, tokenizer, vocabulary)
        if completion.decode("utf-8", errors="replace") != expected and not tie:
            reasons.append(f"export generate at temperature 0 gives {completion.decode('utf-8', errors='replace')!r} "
                           f"after {prompt!r}; the trained model's greedy decoding is {expected!r}")
            break
    bits = text_bits_per_byte(exported, texts)
    export_root = directory.rstrip("/").rsplit("/", 1)[0]
    version = version_number(directory)
    baseline_dir = blessed_baseline(export_root, version, storage.sha256(RunLayout(run_dir).metadata)) \
        if compare else None
    baseline_bits = None
    if baseline_dir is not None:
        baseline_bits = text_bits_per_byte(export_scores(baseline_dir, texts)[0], texts)
        if bits > baseline_bits + MAX_REGRESSION_BITS:
            reasons.append(f"{bits:.4f} bits per byte on the test texts is worse than blessed version "
                           f"{version_number(baseline_dir)}'s {baseline_bits:.4f}")
    return {
        "version": version,
        "modality": "language",
        "examples": len(texts),
        "tokens": int(tokens.sum()),
        "export_bits_per_byte": bits,
        "trainer_bits_per_byte": text_bits_per_byte(trainer, texts),
        "network_bits_per_byte": text_bits_per_byte(exported_network, texts),
        "document_cache_weights": list(cache_weights),
        "trainer_test_bits_per_byte": metrics.get("test", {}).get("bits_per_byte"),
        "max_log_probability_difference": float(difference.max()),
        "tolerance": LOG_PROBABILITY_TOLERANCE,
        "generation_prompts": len(prompts),
        "baseline_version": version_number(baseline_dir) if baseline_dir else None,
        "baseline_bits_per_byte": baseline_bits,
        "max_regression_bits": MAX_REGRESSION_BITS,
        "blessed": not reasons,
        "reasons": reasons,
    }
