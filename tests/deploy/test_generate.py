"""A gpt export: the `generate` and `score` signatures, `kcp generate`, validation, and both served
over REST and gRPC. The run is tests/trainer/test_language_model.py's `language_run` (kcp run --model gpt)."""

import json
import logging
import math
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from deploy.serving import make_server
from kcp import cli
from kcp.core import contract as contract_lib
from kcp.core import document_cache
from tests.conftest import IN_PROCESS_BEAM
from tests.kcp.test_document_cache import brute_force_cache
from tests.trainer.test_language_model import language_run  # noqa: F401  the session's gpt run
import trainer.generate  # noqa: F401  registers the gpt layers for loading model.keras

SEPARATOR = contract_lib.LANGUAGE_SEPARATOR
SETTINGS = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 20, "top_p": 0.95}


@pytest.fixture(scope="module")
def served(language_run):  # noqa: F811
    """The run's blessed export over REST and gRPC; yields (REST url, gRPC stub)."""
    server = make_server(language_run, "127.0.0.1", 0, grpc_port=0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc.port}")
    yield f"http://127.0.0.1:{server.server_address[1]}", prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()
    server.shutdown()
    server.server_close()


def rest(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/models/model:predict", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def grpc_predict(stub, signature: str, inputs: dict) -> dict:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "model", signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    response = stub.Predict(request, timeout=60)
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def kcp_generate(run_dir: str, prompt: str, seed: int, capsys, **settings) -> str:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in {**SETTINGS, **settings}.items()]
    capsys.readouterr()
    assert cli.main(["generate", "--run-dir", run_dir, "--prompt", prompt, "--seed", str(seed), *flags]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n")
    return printed[:-1]


def keras_log_probabilities(model, ids: list[int], context: int) -> list[float]:
    """log P(each of ids, separator | what precedes it after a separator) in windows of the
    context, the test's own arithmetic."""
    sequence = [SEPARATOR, *ids, SEPARATOR]
    scores = []
    for start in range(0, len(sequence) - 1, context):
        window = sequence[start:start + context + 1]
        logits = np.asarray(model(np.array([window[:-1]], np.int32)), np.float64)[0]
        log_softmax = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        scores += [log_softmax[position, target] for position, target in enumerate(window[1:])]
    return scores


def keras_log_probability(model, ids: list[int], context: int) -> float:
    """log P(ids, separator | separator) by the network alone."""
    return sum(keras_log_probabilities(model, ids, context))


def mixed_log_probability(model, ids: list[int], context: int, weights) -> float:
    """log P(ids, separator | separator) by the network mixed with the document cache by `weights`:
    each target's probability (1 - sum(weights)) x network + weight x (the cache of each order, or
    the network where that cache has not seen the target's context), the caches counted by brute force."""
    sequence = [SEPARATOR, *ids, SEPARATOR]
    caches = [brute_force_cache(sequence, order) for order in document_cache.CACHE_ORDERS]
    total = 0.0
    for position, network in enumerate(keras_log_probabilities(model, ids, context)):
        probability = (1 - sum(weights)) * math.exp(network)
        for weight, (cache, seen) in zip(weights, caches):
            probability += weight * (cache[position] if seen[position] else math.exp(network))
        total += math.log(probability)
    return total


def test_the_run_exports_generate_and_score_and_validation_blesses_it(language_run):  # noqa: F811
    version = os.path.join(language_run, "export", "model", "1")
    validation = json.load(open(os.path.join(version, "assets.extra", "validation.json")))
    assert validation["blessed"] is True and validation["reasons"] == []
    assert validation["max_log_probability_difference"] < 1e-3 and validation["examples"] > 0
    assert validation["export_bits_per_byte"] == pytest.approx(validation["trainer_bits_per_byte"], rel=1e-4)
    metrics = json.load(open(os.path.join(language_run, "train", "metrics.json")))
    assert validation["document_cache_weights"] == metrics["document_cache"]["weights"]
    assert validation["export_bits_per_byte"] < validation["network_bits_per_byte"]  # the cache helps here
    loaded = tf.saved_model.load(version)
    assert {"generate", "score", "serving_default"} <= set(loaded.signatures)
    texts = tf.constant([b"def f(x):\n    return x", b""])
    default, score = loaded.signatures["serving_default"](texts=texts), loaded.signatures["score"](texts=texts)
    np.testing.assert_array_equal(default["log_probability"].numpy(), score["log_probability"].numpy())
    assert score["tokens"].numpy().tolist() == [22 + 1, 0 + 1]  # the bytes, and the end of text


def test_score_equals_the_keras_model_log_probability_mixed_with_the_document_cache(language_run):  # noqa: F811
    contract = contract_lib.read_contract(language_run)
    weights = json.load(open(os.path.join(language_run, "train", "metrics.json")))["document_cache"]["weights"]
    assert any(weights)  # the trainer turned the cache on for this corpus: its documents repeat their lines
    model = keras.saving.load_model(os.path.join(language_run, "train", "model.keras"), compile=False)
    score = tf.saved_model.load(os.path.join(language_run, "export", "model", "1")).signatures["score"]
    texts = ["def f3_1(x):\n    return x * 1 + 3\n", "é" * 5 + " short", "x = 1\n" * 15]  # the last: 3 windows of 32
    outputs = score(texts=tf.constant([text.encode("utf-8") for text in texts]))
    context = int(contract.statistics["context_length"])
    for index, text in enumerate(texts):
        ids = contract_lib.encode_language(text, "bytes")
        assert outputs["tokens"].numpy()[index] == len(ids) + 1
        network = keras_log_probability(model, ids, context)
        assert outputs["network_log_probability"].numpy()[index] == pytest.approx(network, abs=1e-3)
        mixed = mixed_log_probability(model, ids, context, weights)
        assert outputs["log_probability"].numpy()[index] == pytest.approx(mixed, abs=1e-3)
    # the cache sees all 90 bytes of the repeated line, where each window of the network sees 32 of them
    assert outputs["log_probability"].numpy()[2] > outputs["network_log_probability"].numpy()[2] + 1


def test_score_runs_the_network_in_chunks_of_windows_and_gets_the_same_log_probabilities(language_run, monkeypatch):  # noqa: F811,E501
    """A long text's logits are not held at once (a megabyte of text would take gigabytes): with a
    budget of two windows' logits, 9 windows run as 5 chunks, the last one padded, to the same figures."""
    from deploy import language

    contract = contract_lib.read_contract(language_run)
    context = int(contract.statistics["context_length"])
    model = keras.saving.load_model(os.path.join(language_run, "train", "model.keras"), compile=False)
    monkeypatch.setattr(language, "SCORE_CHUNK_FLOATS", 2 * context * int(model.output_shape[-1]))
    encoder, decoder = language.language_codec(contract, language_run)
    chunked = language.language_functions(model, contract, encoder, decoder, None)["score"]
    texts = ["def f3_1(x):\n    return x * 1 + 3\n", "é" * 5 + " short", "x = 1\n" * 15]  # 3 rows of 3 windows
    outputs = chunked(texts=tf.constant([text.encode("utf-8") for text in texts]))
    for index, text in enumerate(texts):
        ids = contract_lib.encode_language(text, "bytes")
        assert outputs["tokens"].numpy()[index] == len(ids) + 1
        network = keras_log_probability(model, ids, context)
        assert outputs["network_log_probability"].numpy()[index] == pytest.approx(network, abs=1e-3)


def test_kcp_generate_prints_what_rest_and_grpc_generate_answer(language_run, served, capsys):  # noqa: F811
    url, stub = served
    for seed in (1, 2):
        printed = kcp_generate(language_run, "def f", seed, capsys)
        status, rows = rest(url, {"signature_name": "generate",
                                  "instances": [{"prompts": "def f", "seed": seed, **SETTINGS}]})
        assert status == 200 and rows["predictions"][0] == printed  # one output: its value alone, as TF Serving
        status, columns = rest(url, {"signature_name": "generate",
                                     "inputs": {"prompts": ["def f", "def f"], "seed": seed, **SETTINGS}})
        assert status == 200 and columns["outputs"] == [printed, printed]
        over_grpc = grpc_predict(stub, "generate", {
            "prompts": np.array([b"def f"], dtype=object), "seed": np.int32(seed),
            "max_new_tokens": np.int32(SETTINGS["max_new_tokens"]), "temperature": np.float32(SETTINGS["temperature"]),
            "top_k": np.int32(SETTINGS["top_k"]), "top_p": np.float32(SETTINGS["top_p"])})
        assert over_grpc["completions"][0].decode("utf-8", errors="replace") == printed
    greedy = kcp_generate(language_run, "def f", 1, capsys, temperature=0, max_new_tokens=20)
    assert greedy == kcp_generate(language_run, "def f", 2, capsys, temperature=0, max_new_tokens=20)  # no randomness
    assert len(contract_lib.encode_language(greedy, "bytes")) <= 20


def test_grpc_score_equals_rest_score(served):
    url, stub = served
    texts = ["def f1_2(x):", "return x * 2"]
    status, body = rest(url, {"instances": [{"texts": text} for text in texts]})  # serving_default is score
    assert status == 200
    over_grpc = grpc_predict(stub, "score", {"texts": np.array([t.encode() for t in texts], dtype=object)})
    np.testing.assert_allclose(over_grpc["log_probability"], [row["log_probability"] for row in body["predictions"]],
                               rtol=1e-6)
    assert over_grpc["tokens"].tolist() == [row["tokens"] for row in body["predictions"]] == [13, 13]
    assert all(value < 0 for value in over_grpc["log_probability"])


def test_bad_generate_settings_get_one_line_errors(language_run, served, capsys):  # noqa: F811
    url, _ = served
    status, body = rest(url, {"signature_name": "generate",
                              "instances": [{"prompts": "a", "seed": 0, **SETTINGS, "max_new_tokens": 0}]})
    assert status == 400 and "max_new_tokens must be at least 1" in body["error"]
    status, body = rest(url, {"signature_name": "generate",  # would wrap to -1294967296 as int32
                              "instances": [{"prompts": "a", "seed": 0, **SETTINGS, "max_new_tokens": 3000000000}]})
    assert (status, body) == (400, {"error": "input 'max_new_tokens': 3000000000 is beyond int32's range "
                                             "(-2147483648..2147483647)"})
    status, body = rest(url, {"signature_name": "generate",
                              "instances": [{"prompts": "a", "seed": 0, **SETTINGS, "temperature": 1e39}]})
    assert (status, body) == (400, {"error": "input 'temperature': 1e+39 is beyond float32's range (±3.402823e+38)"})
    status, body = rest(url, {"signature_name": "generate", "instances": [
        {"prompts": "a", "seed": 0, **SETTINGS}, {"prompts": "b", "seed": 1, **SETTINGS}]})
    assert status == 400 and "'seed' is a scalar of the signature" in body["error"]
    capsys.readouterr()
    assert cli.main(["generate", "--run-dir", language_run, "--prompt", "a", "--max-new-tokens", "40"]) == 2
    assert capsys.readouterr().err.strip() == \
        "kcp generate: error: max_new_tokens: 40 must be an integer from 1 to 31 (the context is 32)"
    # no --max-new-tokens on a context of 32: 31 at most, not the 64 the user never asked for
    assert cli.main(["generate", "--run-dir", language_run, "--prompt", "a", "--temperature", "0"]) == 0
    assert cli.main(["generate", "--run-dir", language_run, "--prompt", "a", "--temperature", "-1"]) == 2
    assert capsys.readouterr().err.strip().endswith("temperature: -1.0 must be 0 (greedy) or more, and finite in float32")
    for flag, value, message in [("--temperature", "inf", "temperature: inf must be 0 (greedy) or more, and finite in float32"),
                                 ("--temperature", "1e39", "temperature: 1e+39 must be 0 (greedy) or more, and finite in float32"),
                                 ("--seed", "1" + "0" * 400, f"seed: 1{'0' * 400} must be an integer from -2147483648 to 2147483647"),
                                 ("--seed", "99999999999",  # would not fit the signature's int32
                                  "seed: 99999999999 must be an integer from -2147483648 to 2147483647"),
                                 ("--top-k", "3000000000", "top_k: 3000000000 must be an integer, 0 (off) to 2147483647")]:
        assert cli.main(["generate", "--run-dir", language_run, "--prompt", "a", flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"kcp generate: error: {message}"
    latin = os.path.join(os.path.dirname(language_run), "latin1-prompt.txt")
    with open(latin, "wb") as handle:
        handle.write("café".encode("latin-1"))
    assert cli.main(["generate", "--run-dir", language_run, "--prompt-file", latin]) == 2
    assert capsys.readouterr().err.strip() == f"kcp generate: error: --prompt-file: {latin} is not UTF-8 text"
    assert cli.main(["generate", "--run-dir", language_run, "--prompt", b"\xff".decode("utf-8", "surrogateescape")]) == 2
    assert capsys.readouterr().err.strip() == \
        "kcp generate: error: prompt: not UTF-8 text (it holds bytes that are not UTF-8)"
    from kcp import api
    from kcp.core.errors import UserError
    with pytest.raises(UserError, match=r"^max_new_tokens: 5.5 must be an integer from 1 to 31 \(the context is 32\)$"):
        api.generate(language_run, "a", max_new_tokens=5.5)
    # NumPy's numbers are numbers: a notebook's np.int64 gives what the int gives
    assert api.generate(language_run, "a", max_new_tokens=np.int64(4), temperature=np.float32(1.0), seed=np.int64(3)) \
        == api.generate(language_run, "a", max_new_tokens=4, temperature=1.0, seed=3)


def test_generate_defaults_leave_the_prompt_half_the_context_and_a_cut_prompt_is_said(language_run, caplog):  # noqa: F811
    """Context 32: max_new_tokens defaulted to 31, which left the prompt one token (any two prompts
    gave the same text, silently); the API's temperature was 1.0 where the command's is 0.8."""
    from kcp import api

    default = api.generate(language_run, "def fib", seed=5)
    assert default == api.generate(language_run, "def fib", seed=5, max_new_tokens=16, temperature=0.8)
    assert not [record for record in caplog.records if record.name == "kcp.generate"]
    with caplog.at_level(logging.WARNING, logger="kcp.generate"):
        api.generate(language_run, "x" * 40, max_new_tokens=8, seed=5)  # 40 bytes + the separator: 41 > 32 - 8
    assert [record.getMessage() for record in caplog.records if record.name == "kcp.generate"] == [
        "generate: the prompt is 41 tokens with its document separator; the model sees its last 24 (the context, "
        "32, less max_new_tokens, 8): lower max_new_tokens to keep more of it"]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """`kcp preprocess`, `train`, `export` and `validate` of a gpt with data.tokenizer=bpe on
    language_run's tiny corpus, one epoch, context 16 (validate's 16 new tokens must shrink to fit).
    `kcp validate` runs as its own process, which has never imported tensorflow_text: the export's
    tokenizer holds TensorFlow Text ops, so this also checks that deploy.saved_model registers them."""
    from tests.trainer.test_language_model import TINY_GPT, write_corpus

    root = tmp_path_factory.mktemp("language_bpe")
    run_dir = str(root / "run")
    overrides = [*TINY_GPT, "train.epochs=1", "data.tokenizer=bpe", "data.vocab_size=320", "data.context_length=16"]
    assert cli.main(["preprocess", "--run-dir", run_dir, "--source", f"text:{write_corpus(root / 'corpus')}",
                     *[part for key in ["model.name=gpt", *overrides] for part in ("--set", key)],
                     "--", *IN_PROCESS_BEAM]) == 0
    for command in ("train", "export"):
        assert cli.main([command, "--run-dir", run_dir]) == 0
    validate = subprocess.run([sys.executable, "-m", "kcp.cli", "validate", "--run-dir", run_dir],
                              capture_output=True, text=True, timeout=600)
    assert validate.returncode == 0 and "-> blessed" in validate.stdout, validate.stderr[-2000:]
    return run_dir


def test_validating_a_corpus_without_test_documents_says_what_a_corpus_needs(language_run, tmp_path, capsys):  # noqa: F811,E501
    """A one-file corpus puts its one document in train: "give data.split a test fraction" could not help."""
    import shutil

    run_dir = str(tmp_path / "run")
    shutil.copytree(language_run, run_dir)
    metadata = os.path.join(run_dir, "data", "metadata.json")
    contract = json.load(open(metadata))
    contract["splits"]["test"]["count"] = 0
    json.dump(contract, open(metadata, "w"))
    assert cli.main(["validate", "--run-dir", run_dir]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kcp validate: error: {run_dir}: the test split is empty, so there is nothing to validate the export on; a "
        "corpus's documents go whole to one split, so give it more files (data.split then puts some in test), or "
        "serve without validation (kcp serve --allow-unvalidated)")


def test_generate_and_report_refuse_a_model_trained_on_another_contract(language_run, tmp_path, capsys):  # noqa: F811
    """A preprocess rerun after training (another tokenizer or context) used to pair the old model with
    the new contract: garbage completions, or a traceback; export already refused it."""
    import shutil

    run_dir = str(tmp_path / "run")
    shutil.copytree(language_run, run_dir)
    with open(os.path.join(run_dir, "data", "metadata.json"), "a", encoding="utf-8") as handle:
        handle.write("\n")  # another contract file, as a preprocess rerun makes
    shutil.rmtree(os.path.join(run_dir, "report"), ignore_errors=True)
    for argv, before in ((["generate", "--run-dir", run_dir, "--prompt", "a"], "generating"),
                         (["report", "--run-dir", run_dir], "reporting")):  # the report's figures would mix the two
        capsys.readouterr()
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.strip() == (
            f"kcp {argv[0]}: error: {run_dir}/train/model.keras was trained on another data contract than "
            f"{run_dir}/data/metadata.json (preprocessed again since); run `kcp train --run-dir {run_dir}` before {before}")
    assert not os.path.exists(os.path.join(run_dir, "report"))  # nothing half-written


def test_a_bpe_run_trains_in_bits_per_byte_and_exports_what_kcp_generate_prints(bpe_run, capsys):
    contract = contract_lib.read_contract(bpe_run)
    statistics, merges = contract.statistics, contract_lib.language_vocabulary(bpe_run)
    assert statistics["tokenizer"] == "bpe" and statistics["vocab_size"] == 259 + len(merges) > 259
    # bits per byte divide by the bytes the target tokens encode: about 3 bytes a token here, not 1
    test = json.load(open(os.path.join(bpe_run, "train", "metrics.json")))["test"]
    assert statistics["target_bytes"]["test"] > 2 * statistics["tokens"]["test"]
    assert test["bits_per_byte"] == pytest.approx(test["nats_per_token"] * statistics["tokens"]["test"] /
                                                  statistics["target_bytes"]["test"] / np.log(2), rel=1e-6)
    loaded = tf.saved_model.load(os.path.join(bpe_run, "export", "model", "1"))
    texts = ["def f3_1(x):\n    return x * 1 + 3\n", "", "  é\u00a0日本 \t\n\n  x\x00y", "x = 1\n" * 12]
    scores = loaded.signatures["score"](texts=tf.constant([text.encode("utf-8") for text in texts]))
    ids = [contract_lib.encode_language(text, "bpe", merges) for text in texts]
    assert scores["tokens"].numpy().tolist() == [len(row) + 1 for row in ids]
    assert len(ids[0]) < len(texts[0]) / 2  # merged
    model = keras.saving.load_model(os.path.join(bpe_run, "train", "model.keras"), compile=False)
    weights = json.load(open(os.path.join(bpe_run, "train", "metrics.json")))["document_cache"]["weights"]
    for index, row in enumerate(ids):  # the graph scores the pipeline's ids, token for token
        assert scores["network_log_probability"].numpy()[index] == pytest.approx(
            keras_log_probability(model, row, int(statistics["context_length"])), abs=1e-3)
        assert scores["log_probability"].numpy()[index] == pytest.approx(
            mixed_log_probability(model, row, int(statistics["context_length"]), weights), abs=1e-3)
    printed = kcp_generate(bpe_run, "def f", 3, capsys)
    exported = loaded.signatures["generate"](prompts=tf.constant([b"def f"]), seed=tf.constant(3), **{
        key: tf.constant(value) for key, value in SETTINGS.items()})["completions"].numpy()[0]
    assert exported.decode("utf-8", errors="replace") == printed and printed  # what `kcp serve` runs



def test_validation_texts_are_spread_over_the_split_not_one_long_documents_pieces(language_run, monkeypatch):  # noqa: F811
    """A long document spans a piece a block: the first 64 pieces in file order were often all
    its own, and validation and the export's warmup scored that one document."""
    from deploy import language

    contract = contract_lib.read_contract(language_run)
    tokenizer = contract_lib.language_tokenizer(contract)
    vocabulary = contract_lib.language_vocabulary(language_run, contract)
    width = int(contract.statistics["context_length"]) + 1

    def block(*texts):
        ids = []
        for text in texts:
            ids += [*contract_lib.encode_language(text, tokenizer, vocabulary), SEPARATOR]
        ids = ids[:-1] if len(texts) == 1 else ids  # one text alone: a part of a document, no end in this block
        return ids[:width] + [contract_lib.LANGUAGE_PAD] * (width - len(ids[:width]))

    blocks = [block(f"long part {index:03d} of one document") for index in range(100)]
    blocks += [block(f"short {index:02d} one", f"short {index:02d} two") for index in range(20)]
    batches = [(tf.constant(blocks[start:start + 64]), None, None) for start in range(0, len(blocks), 64)]
    monkeypatch.setattr(language.example_lib, "read_split", lambda *args, **kwargs: iter(batches))
    texts = language.language_texts(contract, language_run, "test", count=8)
    assert len(texts) == 8 and texts[0] == "long part 000 of one document", texts
    assert texts[-1] == "short 19 two"
    assert sum(text.startswith("short") for text in texts) >= 2, texts
    assert len(language.language_texts(contract, language_run, "test", count=500)) == 140  # fewer: every one
