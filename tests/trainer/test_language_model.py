"""A gpt language model through the trainer: next-token pairs, the padding-free loss, perplexity and
bits per byte, the family's training defaults, the per-epoch samples and the report.

`language_run` (also used by tests/deploy/test_generate.py) is one `kcp run --model gpt` on a tiny
text folder: preprocess, train, export, validate, report.
"""

import json
import math
import os

import keras
import numpy as np
import pytest
import yaml

from kcp import cli
from kcp.core import contract as contract_lib
from kcp.core.config_load import load_config
from tests.conftest import IN_PROCESS_BEAM
from trainer.language_metrics import NatsPerToken
from trainer.objectives import make_optimizer

TINY_GPT = ["data.context_length=32", "model.layers=1", "model.dim=32", "model.heads=2", "train.epochs=2",
            "train.batch_size=32"]


def write_corpus(directory) -> str:
    """40 small documents of Python-like text (about 9 KB)."""
    os.makedirs(directory, exist_ok=True)
    for index in range(40):
        with open(os.path.join(directory, f"doc{index:02d}.txt"), "w", encoding="utf-8") as handle:
            handle.write("".join(f"def f{index}_{j}(x):\n    return x * {j} + {index}\n\n" for j in range(6)))
    return str(directory)


_BUILT: dict = {}  # one run per session, also when test_generate.py's import of the fixture asks again


@pytest.fixture(scope="session")
def language_run(tmp_path_factory):
    """A run directory after `kcp run --model gpt` on a tiny text folder (context 32, width 32)."""
    if tmp_path_factory.getbasetemp() in _BUILT:
        return _BUILT[tmp_path_factory.getbasetemp()]
    root = tmp_path_factory.mktemp("language")
    corpus = write_corpus(root / "corpus")
    run_dir = str(root / "run")
    overrides = [part for key in TINY_GPT for part in ("--set", key)]
    code = cli.main(["run", "--run-dir", run_dir, "--source", f"text:{corpus}", "--model", "gpt", *overrides,
                     "--", *IN_PROCESS_BEAM])
    assert code == 0
    _BUILT[tmp_path_factory.getbasetemp()] = run_dir
    return run_dir


def read_json(run_dir: str, *parts: str):
    with open(os.path.join(run_dir, *parts), encoding="utf-8") as handle:
        return json.load(handle)


def test_training_reports_perplexity_and_exact_bits_per_byte(language_run):
    metrics = read_json(language_run, "train", "metrics.json")
    contract = contract_lib.read_contract(language_run)
    statistics = contract.statistics
    assert metrics["model"] == "gpt" and metrics["epochs"] == 2
    for split in ("train", "validation", "test"):
        scores = metrics[split]
        assert math.isfinite(scores["loss"]) and 0 < scores["nats_per_token"] < math.log(259) + 0.5
        # the loss is a mean of per-batch means; nats_per_token weighs every real token alike
        assert scores["nats_per_token"] == pytest.approx(scores["loss"], rel=0.02)
        assert scores["perplexity"] == pytest.approx(math.exp(scores["nats_per_token"]), rel=1e-6)
        expected = scores["nats_per_token"] * statistics["tokens"][split] / statistics["target_bytes"][split] / math.log(2)
        assert scores["bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    assert metrics["tokens_per_second"] == pytest.approx(metrics["examples_per_second"] * 32)
    history = read_json(language_run, "train", "history.json")
    assert len(history["val_bits_per_byte"]) == len(history["bits_per_byte"]) == 2
    validation = statistics["tokens"]["validation"] / statistics["target_bytes"]["validation"] / math.log(2)
    assert history["val_bits_per_byte"][-1] == pytest.approx(history["val_nats_per_token"][-1] * validation, rel=1e-6)
    assert history["val_loss"][1] < history["val_loss"][0]  # it learns
    assert not os.path.exists(os.path.join(language_run, "train", "confusion_matrix.json"))
    assert os.path.exists(os.path.join(language_run, "train", "checkpoints", "best.weights.h5"))  # by val_loss


def test_the_trainer_fits_the_document_cache_on_the_validation_documents(language_run):
    from kcp.core import document_cache
    from trainer.language_metrics import split_documents

    contract = contract_lib.read_contract(language_run)
    data_dir = os.path.join(language_run, "data")
    corpus = {open(os.path.join(os.path.dirname(language_run), "corpus", name), encoding="utf-8").read()
              for name in os.listdir(os.path.join(os.path.dirname(language_run), "corpus"))}
    cache = read_json(language_run, "train", "metrics.json")["document_cache"]
    for split in ("validation", "test"):
        # the shards' blocks give back the split's documents whole, one per source file
        documents = [contract_lib.decode_language(ids, "bytes") for ids in split_documents(contract, data_dir, split, 10**9)]
        assert len(documents) == contract.statistics["documents"][split] > 0 and set(documents) <= corpus
        assert cache[split]["documents"] == len(documents)
        assert cache[split]["bytes"] == sum(len(text.encode("utf-8")) + 1 for text in documents)
        assert cache[split]["tokens"] == sum(len(contract_lib.encode_language(text, "bytes")) + 1 for text in documents)
    assert len(split_documents(contract, data_dir, "validation", 1)) == 1  # whole documents, at least one
    assert cache["fitted_on"] == "validation" and tuple(cache["weights"]) in document_cache.grid()
    assert cache["orders"] == list(document_cache.CACHE_ORDERS)
    # these documents repeat their own lines, which a 32-byte context cannot see: the cache helps
    assert cache["validation"]["bits_per_byte"] < cache["validation"]["network_bits_per_byte"] - 0.05
    assert cache["test"]["bits_per_byte"] < cache["test"]["network_bits_per_byte"]
    from kcp.cli.commands import document_cache_figures  # what `kcp train` and `kcp run` print

    assert document_cache_figures({"test": {}}) == ""
    assert document_cache_figures(read_json(language_run, "train", "metrics.json")).startswith(
        f"{cache['test']['bits_per_byte']:.4f} bits per byte with the document cache (network alone "
        f"{cache['test']['network_bits_per_byte']:.4f}; weights ")


def test_the_gpt_training_defaults_are_applied_and_recorded(language_run):
    with open(os.path.join(language_run, "config.yaml"), encoding="utf-8") as handle:
        recorded = load_config([yaml.safe_load(handle)])
    train = recorded.train
    assert (train.optimizer, train.learning_rate, train.weight_decay, train.clip_norm, train.monitor) == \
        ("adamw", 2e-3, 0.1, 1.0, "val_loss")
    assert (recorded.tune.objective, recorded.tune.direction) == ("val_loss", "min")
    assert train.epochs == 2 and recorded.data.context_length == 32  # the command's own values stay


def test_family_defaults_yield_to_explicit_keys_and_leave_with_the_family():
    cnn_run = load_config([], ["model.name=cnn", "train.learning_rate=0.05"]).to_dict()
    gpt = load_config([], ["model.name=gpt", "train.epochs=3"], base=cnn_run)
    # gpt's own defaults replace what the cnn run recorded (its learning rate included) ...
    assert (gpt.train.optimizer, gpt.train.learning_rate, gpt.train.weight_decay, gpt.train.monitor) == \
        ("adamw", 2e-3, 0.1, "val_loss")
    assert (gpt.train.epochs, gpt.train.batch_size) == (3, 8)
    assert load_config([], ["model.name=gpt"]).train.epochs == 4  # sized for ~30 min on 2 cores (bpe)
    # ... a --set wins over them, and a run that records gpt keeps what it holds
    assert load_config([], ["model.name=gpt", "train.learning_rate=0.01"]).train.learning_rate == 0.01
    tuned = load_config([], ["train.clip_norm=0.5"], base=gpt.to_dict())
    assert (tuned.train.optimizer, tuned.train.clip_norm) == ("adamw", 0.5)
    # switching back gives the shared defaults, not gpt's
    back = load_config([], ["model.name=cnn"], base=gpt.to_dict())
    assert (back.train.optimizer, back.train.weight_decay, back.train.monitor) == ("adam", 0.0, "val_accuracy")
    assert (back.train.batch_size, back.train.epochs) == (64, 30)  # keys a family defaults leave with it
    assert (back.tune.objective, back.tune.direction) == ("val_accuracy", "max")


def test_samples_are_written_after_every_epoch(language_run):
    with open(os.path.join(language_run, "train", "samples.jsonl"), encoding="utf-8") as handle:
        samples = [json.loads(line) for line in handle]
    assert [sample["epoch"] for sample in samples] == [1, 2]
    assert samples[0]["prompt"] == samples[1]["prompt"] and samples[0]["prompt"].startswith("def f")
    assert all(isinstance(sample["completion"], str) for sample in samples)


def test_an_older_trainings_samples_go_when_this_one_starts(tmp_path):
    """A retrain killed before its first sample must not show the older training's six epochs; a resume
    at epoch 2 keeps epochs 1 and 2."""
    from trainer.callbacks import LanguageSamples

    path = str(tmp_path / "samples.jsonl")
    old = "".join(json.dumps({"epoch": e, "prompt": "p", "completion": "c"}) + "\n" for e in range(1, 7))
    for start, kept in ((0, []), (2, [1, 2])):
        with open(path, "w") as handle:
            handle.write(old)
        LanguageSamples(path, "p", lambda model: "").on_epoch_begin(start)
        left = [json.loads(line)["epoch"] for line in open(path)] if os.path.exists(path) else []
        assert left == kept


def test_nats_per_token_leaves_padding_out():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]], np.float32))
    targets = np.array([[1, 2, contract_lib.LANGUAGE_PAD]])  # the third position is padding
    metric = NatsPerToken()
    metric.update_state(targets, logits)
    metric.update_state(np.array([[2, 0, 0]]), logits)  # one real token in the second batch
    expected = -(math.log(0.25) + math.log(0.8) + math.log(0.25)) / 3
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)


def test_weight_decay_spares_vectors_as_in_gpt2():
    config = load_config([], ["train.optimizer=adamw", "train.weight_decay=0.5"]).train
    matrix, vector = keras.Variable(np.ones((2, 2), np.float32)), keras.Variable(np.ones(2, np.float32))
    optimizer = make_optimizer(config, 0.1, decay_matrices_only=True, variables=[matrix, vector])
    optimizer.apply_gradients([(np.zeros((2, 2), np.float32), matrix), (np.zeros(2, np.float32), vector)])
    np.testing.assert_allclose(np.asarray(matrix), 1 - 0.1 * 0.5)  # decoupled decay: lr x wd x weight
    np.testing.assert_allclose(np.asarray(vector), 1.0)


def test_report_shows_bits_per_byte_samples_attention_and_the_few_shot_prompt(language_run):
    from kcp.reporting import FEW_SHOT_PROMPT

    report_dir = os.path.join(language_run, "report")
    with open(os.path.join(report_dir, "index.html"), encoding="utf-8") as handle:
        page = handle.read()
    for heading in ("Learning curves", "Samples per epoch", "Attention maps", "Few-shot prompt", "Config", "Metrics"):
        assert f"<h2>{heading}</h2>" in page
    assert "test bits per byte" in page and "Confusion matrix" not in page
    cache = read_json(language_run, "train", "metrics.json")["document_cache"]
    assert f"{cache['test']['bits_per_byte']:.4f} ({cache['test']['network_bits_per_byte']:.4f})" in page
    assert "farduddle is:" in page and "whatpu" in FEW_SHOT_PROMPT
    assert {"curves.png", "attention.png"} <= set(os.listdir(report_dir))
    from PIL import Image

    attention = np.asarray(Image.open(os.path.join(report_dir, "attention.png")).convert("L"), np.float32)
    assert attention.std() > 5


def test_a_one_document_corpus_says_its_test_split_is_empty_not_nan(tmp_path, capsys):
    """One document is all in one split (the split is by document): the run trains and says it has
    no test figure, rather than printing `test nan bits per byte`."""
    corpus = tmp_path / "one.txt"
    corpus.write_text("".join(f"def g{j}(x):\n    return x + {j}\n\n" for j in range(30)))
    overrides = [part for key in [*TINY_GPT, "train.epochs=1"] for part in ("--set", key)]
    capsys.readouterr()
    command = ["run", "--run-dir", str(tmp_path / "run"), "--source", f"text:{corpus}", "--model", "gpt", *overrides]
    assert cli.main([*command, "--", *IN_PROCESS_BEAM]) == 2  # this one document's key hashes to another split
    assert capsys.readouterr().err.strip().endswith(
        "gave the train split no text to learn from: its 28 windows are all in the other splits, which take whole "
        "documents (data.split [0.8, 0.1, 0.1]); add documents, or set data.split=[1.0,0.0,0.0]")
    assert cli.main([*command, "--set", "data.split=[1.0,0.0,0.0]", "--", *IN_PROCESS_BEAM]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    assert "[train] no test figure: the test split got no documents (add documents)" in out
    assert "reloaded  the test split is empty: not validated" in out
