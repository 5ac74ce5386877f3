"""`data.tokenizer`: the Python tokenizer of the Beam vocabulary pass and the in-graph one of the
trainer and the export agree token for token; vocab.txt and labels.txt survive any character
but a line feed; a text run round-trips through preprocess, train, export and serve."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kcp import cli
from kcp.core import char_ngrams as ngram_lib
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core.contract import TEXT_TOKENIZERS, TOKENIZERS, ContractError, tokenize_text
from tests.conftest import IN_PROCESS_BEAM
from tests.pipeline.test_contract import make_contract

TRICKY = [
    "A good movie, truly good!", "}", "{ \\", "~~ ^<<<<", "", "   \t\n ", "foo_bar(x) -> y[0];",
    "AB-12/x7 SKU#445.2", "Ünïcode ÉTÉ café naïve", "tab\tand\nnew\r\nlines\x0b\x0cend",
    "sep\x1crecord\x1dgroup\x1eunit", "line\u2028para\u2029next\u0085end", "emoji 😀😀 ok", "don't stop-believing...",
    "MiXeD CaSe 123 4.5e-3",
]


def in_graph_tokens(run_dir: str, tokenizer: str, texts: list[str]) -> list[list[str]]:
    """Tokens of the contract's TextVectorization (`text_vectorizer`), read back through its vocabulary."""
    vocabulary = sorted({token for text in texts for token in tokenize_text(text, tokenizer)})
    contract = make_contract(modality="text", statistics={"max_length": 64, "tokenizer": tokenizer})
    contract_lib.write_contract(run_dir, contract, vocabulary)
    layer = example_lib.text_vectorizer(contract, run_dir)
    ids = np.asarray(layer(tf.constant(texts)))
    lookup = layer.get_vocabulary()
    return [[lookup[i] for i in row if i] for row in ids]


def python_gram_ids(text: str, n: int, buckets: int, max_characters: int) -> list[int]:
    """The ids of `char_ngrams.char_ngrams`, each gram hashed on its own."""
    grams = ngram_lib.char_ngrams(text, n, max_characters)
    return list(np.asarray(tf.strings.to_hash_bucket_fast(tf.constant(grams, tf.string), buckets - 1)) + 1)


@pytest.mark.parametrize("n, max_characters", [(4, 12), (2, 40), (1, 3)])
def test_python_and_in_graph_character_ngrams_agree_gram_for_gram(n, max_characters):
    buckets = 1000
    ids = np.asarray(example_lib.char_ngram_ids(tf.constant(TRICKY), n, buckets, max_characters))
    assert ids.shape == (len(TRICKY), ngram_lib.char_ngram_count(n, max_characters))
    for text, row in zip(TRICKY, ids):
        expected = python_gram_ids(text, n, buckets, max_characters)
        assert list(row[:len(expected)]) == expected and not row[len(expected):].any()
        assert all(1 <= i < buckets for i in expected)


def test_text_features_are_the_tokens_then_the_ngrams_and_contracts_without_ngrams_keep_the_tokens(tmp_path):
    from trainer.models import ModelInputs

    texts = ["a b,", "b"]
    grams = {"char_ngrams": 2, "char_ngram_buckets": 100, "max_characters": 5}
    for statistics, width in [({}, 8), (grams, 8 + 7 + 6)]:  # before n-grams (or data.char_ngrams=0); with them
        contract = make_contract(modality="text", statistics={"max_length": 8, "tokenizer": "words", "vocab_size": 4,
                                                              **statistics})
        contract_lib.write_contract(str(tmp_path), contract, ["a", "b"])
        features = np.asarray(example_lib.text_vectorizer(contract, str(tmp_path))(tf.constant(texts)))
        assert features.shape == (2, width)
        assert features[:, :8].tolist() == [[2, 3, 0, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0, 0, 0]]
        if statistics:
            assert features[0, 8:].tolist() == python_gram_ids("a b,", 2, 100, 5) + [0, 0]  # 4 of 5 characters
        spec = ModelInputs.from_contract(contract)
        assert spec.shape == (8,) and spec.input_shape == (width,)


def test_what_the_character_ngrams_of_a_line_are():
    # lower-cased ASCII, whitespace runs one space, cut to max_characters, a space on each side
    assert ngram_lib.char_ngram_text("  Ab \t C!\n") == "ab c!"
    assert ngram_lib.char_ngrams("Ab\tC!", 2, 3) == [" ", "a", "b", " ", " ", " a", "ab", "b ", "  "]
    assert ngram_lib.char_ngrams("", 3, 5) == [" ", " ", "  "]  # an empty text still has its boundary
    assert ngram_lib.char_ngram_count(2, 3) == 5 + 4 and ngram_lib.char_ngram_count(4, 1) == 3 + 2 + 1


@pytest.mark.parametrize("tokenizer", TEXT_TOKENIZERS)
def test_python_and_in_graph_tokenizers_agree_token_for_token(tmp_path, tokenizer):
    assert in_graph_tokens(str(tmp_path), tokenizer, TRICKY) == [tokenize_text(text, tokenizer) for text in TRICKY]


def test_the_tokenizers_of_text_and_of_language_data():
    assert TOKENIZERS == ("words", "words_and_punctuation", "characters", "bytes", "bpe")
    assert contract_lib.LANGUAGE_TOKENIZERS == ("bytes", "characters", "bpe")
    with pytest.raises(ValueError, match="data.tokenizer: 'bytes' is not one of words, words_and_punctuation"):
        tokenize_text("x", "bytes")  # bytes is for language data (contract.encode_language)
    assert contract_lib.encode_language("é\n", "bytes") == [0xC3 + 3, 0xA9 + 3, ord("\n") + 3]
    assert contract_lib.encode_language("é\nz", "characters", ["\n", "é"]) == [4, 3, contract_lib.LANGUAGE_UNKNOWN]
    # bpe: the bytes' ids, then one id per merge (GPT-2's byte symbols: 0xC3 "Ã", 0xA9 "©")
    assert contract_lib.encode_language("é\nz", "bpe", ["Ã ©"]) == [259, ord("\n") + 3, ord("z") + 3]


def test_what_each_tokenizer_makes_of_a_line():
    line = "Call foo_bar(x), NOW!"
    assert tokenize_text(line, "words") == ["call", "foobarx", "now"]
    assert tokenize_text(line, "words_and_punctuation") == ["call", "foo", "_", "bar", "(", "x", ")", ",", "now", "!"]
    assert tokenize_text("Ab  c\t!", "characters") == ["a", "b", " ", "c", " ", "!"]
    assert tokenize_text("~~ ^<<<<", "words") == [] and tokenize_text("~~ ^<<<<", "words_and_punctuation")


@pytest.mark.parametrize("tokenizer", TEXT_TOKENIZERS)
def test_the_in_graph_tokenizer_is_the_same_inside_tf_data_and_after_a_config_round_trip(tokenizer):
    layer = keras.layers.TextVectorization(**example_lib.TOKENIZER_LAYER_SETTINGS[tokenizer], output_mode="int",
                                           output_sequence_length=16, vocabulary=["a", "b", ",", " "])
    clone = keras.layers.TextVectorization.from_config(json.loads(json.dumps(
        keras.saving.serialize_keras_object(layer)))["config"])  # the registered split functions load by name
    texts = tf.constant(["a, b", "B  a!", ""])
    eager = np.asarray(layer(texts))
    mapped = np.concatenate(list(tf.data.Dataset.from_tensor_slices(texts).batch(2).map(clone).as_numpy_iterator()))
    np.testing.assert_array_equal(eager, mapped)


def test_labels_and_vocabulary_keep_tokens_that_splitlines_would_split(tmp_path):
    odd = ["a\x1cb", "c\u2028d", "e\u0085f", "g\x1dh\x1ei", "cr\rlf", "plain", " "]
    contract = make_contract(class_names=tuple(odd))
    contract_lib.write_contract(str(tmp_path), contract, vocabulary=odd)
    assert contract_lib.read_vocabulary(str(tmp_path)) == odd
    assert contract_lib.read_lines((tmp_path / "data" / "labels.txt").read_bytes().decode()) == odd
    with pytest.raises(ContractError, match="line break"):
        contract_lib.write_contract(str(tmp_path), make_contract(class_names=("one\ntwo", "three")))


def test_the_characters_tokenizer_round_trips_through_preprocess_train_export_and_serve(tmp_path):
    tokenizer = "characters"  # the farthest from the words of the default; each step runs as its command
    lines = {"code": ["x = f(y);", "if (a) { b(); }", "return g(z);", "{ }"],
             "prose": ["the cat sat", "a dog ran far", "we went home", "so it goes"]}
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n"
                            for _ in range(6) for label, texts in lines.items() for text in texts))
    run_dir = str(tmp_path / "run")
    code = cli.main(["preprocess", "--source", f"jsonl:{path}", "--run-dir", run_dir,
                     "--set", f"data.tokenizer={tokenizer}", "--set", "data.min_count=1", "--", *IN_PROCESS_BEAM])
    code = code or cli.main(["train", "--run-dir", run_dir, "--model", "cnn", "--set", "train.epochs=8",
                             "--set", "model.filters=[16]"])
    code = code or cli.main(["export", "--run-dir", run_dir])
    assert code == 0
    contract = contract_lib.read_contract(run_dir)
    assert contract.statistics["tokenizer"] == tokenizer
    vocabulary = contract_lib.read_vocabulary(run_dir)
    assert ("{" in vocabulary) and ((" " in vocabulary) == (tokenizer == "characters"))
    # The export tokenizes raw strings in its graph; the trainer's model on the Python tokenizer's ids
    # must give the same probabilities.
    texts = ["if (x) { y(); }", "the dog sat", "}"]
    index = {token: i + contract_lib.RESERVED_TOKEN_IDS for i, token in enumerate(vocabulary)}
    length = int(contract.statistics["max_length"])
    n, buckets, max_characters = ngram_lib.char_ngram_settings(contract)
    assert n == ngram_lib.DEFAULT_CHAR_NGRAMS  # the default: the models also see character n-grams
    ids = np.zeros((len(texts), length + ngram_lib.char_ngram_count(n, max_characters)), dtype=np.int32)
    for row, text in enumerate(texts):
        tokens = [index.get(token, 1) for token in tokenize_text(text, tokenizer)][:length]
        ids[row, :len(tokens)] = tokens
        grams = python_gram_ids(text, n, buckets, max_characters)
        ids[row, length:length + len(grams)] = grams
    model = keras.saving.load_model(os.path.join(run_dir, "train", "model.keras"))
    serve = tf.saved_model.load(os.path.join(run_dir, "export", "model", "1")).signatures["serving_default"]
    served = serve(text=tf.constant(texts))["probabilities"].numpy()
    np.testing.assert_allclose(served, model.predict(ids, verbose=0), atol=1e-5)
    assert served[0].argmax() == contract.class_names.index("code")


def product_code_lines(count: int, seed: int = 0) -> list[dict]:
    """Lines "order <code>" of 3 product families, each code unique: random letters and digits around its
    family's 3-character mark at a random place. No word repeats, so a word vocabulary has only "order"."""
    rng = np.random.default_rng(seed)
    marks = {"valve": "qz7", "pump": "xk2", "hose": "jw9"}
    alphabet = list("abcdefghilmnoprstuv013456")  # no letter or digit of the marks
    rows = []
    for index in range(count):
        label = list(marks)[index % len(marks)]
        before, after = ("".join(rng.choice(alphabet, size=k)) for k in rng.integers(2, 6, size=2))
        rows.append({"text": f"order {before}{marks[label]}{after}".upper(), "label": label})
    return rows


@pytest.mark.parametrize("char_ngrams, least, most", [(4, 0.9, 1.0), (0, 0.0, 0.6)])
def test_character_ngrams_read_the_codes_a_word_vocabulary_cannot(tmp_path, char_ngrams, least, most):
    path = tmp_path / "codes.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in product_code_lines(360)))
    run_dir = str(tmp_path / "run")
    code = cli.main(["preprocess", "--source", f"jsonl:{path}", "--run-dir", run_dir,
                     "--set", f"data.char_ngrams={char_ngrams}", "--", *IN_PROCESS_BEAM])
    code = code or cli.main(["train", "--run-dir", run_dir, "--model", "cnn", "--set", "train.epochs=12",
                             "--set", "model.filters=[16]", "--set", "train.learning_rate=0.005"])
    assert code == 0
    assert contract_lib.read_vocabulary(run_dir) == ["order"]  # every code is seen once: out of the vocabulary
    metrics = json.loads((tmp_path / "run" / "train" / "metrics.json").read_text())
    accuracy = metrics["validation"]["accuracy"]  # chance is 1/3
    assert least <= accuracy <= most, (char_ngrams, metrics["validation"])
