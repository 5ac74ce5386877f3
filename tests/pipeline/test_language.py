"""Language-modelling data: text corpora (text:PATH, python-stdlib) -> packed token blocks and the
`language` contract; the Python codec and the in-graph encoder/decoder agree token for token."""

import collections
import functools
import math
import os
import sysconfig

import numpy as np
import pytest
import tensorflow as tf

from kcp.core import bpe
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core.config_load import load_config
from kcp.core.contract import LANGUAGE_PAD, LANGUAGE_SEPARATOR, decode_language, encode_language
from kcp.core.sources import plan_source, read_task
from kcp.core.sources.corpus import stdlib_files
from pipeline import splits
from pipeline.preprocess import run_preprocess
from tests.conftest import IN_PROCESS_BEAM

CONTEXT = 16
DOCUMENTS = {f"notes/{i:02d}.txt": f"note {i}: " + "spam and eggs; " * (i % 5) + "\n" for i in range(24)}
DOCUMENTS.update({
    "README.md": "# Corpus\n\nA tiny corpus for the tests.\n",
    "code/main.py": "def main():\n    return 'tab\\there'\n",
    "unicode/π.txt": "café naïve — 😀 Ünïcode ÉTÉ\n日本語のテキスト\n",
})
BAD = {"data/blob.bin": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "latin1.txt": "résumé".encode("latin-1")}
SKIPPED = {"empty.txt": b"", ".git/config": b"[core]\n", "notes/.hidden.txt": b"not read\n"}
TRICKY = ["", "hello", "tab\tand\nnew\r\nlines", "café naïve — 😀", "日本語", "\ufeffbom", "a\x00b", " " * 3]


def write_corpus(root) -> str:
    for name, text in DOCUMENTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    for name, raw in {**BAD, **SKIPPED}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(raw)
    return str(root)


def preprocess(corpus: str, run_dir: str, *overrides: str):
    config = load_config([], [f"data.source=text:{corpus}", f"data.context_length={CONTEXT}",
                              "data.max_bad_fraction=0.2", *overrides])
    return run_preprocess(config, run_dir, IN_PROCESS_BEAM)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def bytes_run(corpus, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("lm_bytes"))
    return run_dir, preprocess(corpus, run_dir)


@pytest.fixture(scope="module")
def characters_run(corpus, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("lm_characters"))
    return run_dir, preprocess(corpus, run_dir, "data.tokenizer=characters", "data.min_count=2")


def documents_by_split() -> dict:
    """{split: [key, ...] sorted}: what the stable key hash assigns, as the pipeline must."""
    assigned = {split: [] for split in splits.SPLITS}
    for key in sorted(DOCUMENTS):
        assigned[splits.stable_split(key, (0.8, 0.1, 0.1), 42)].append(key)
    return assigned


def read_blocks(run_dir: str, contract, split: str):
    """(blocks (n, T+1) int32, keys) of a split, in file order."""
    blocks, keys = [], []
    for tokens, labels, batch_keys in example_lib.read_split(contract, contract_lib.data_dir(run_dir), split, 64):
        assert labels is None
        blocks.append(tokens.numpy())
        keys += [key.decode() for key in batch_keys.numpy()]
    return (np.concatenate(blocks) if blocks else np.zeros((0, CONTEXT + 1), np.int32)), keys


def test_blocks_are_the_split_s_documents_in_key_order_with_separators(bytes_run):
    run_dir, contract = bytes_run
    assigned = documents_by_split()
    assert all(assigned.values())  # the corpus is large enough that every split holds documents
    for split, names in assigned.items():
        blocks, keys = read_blocks(run_dir, contract, split)
        assert blocks.shape[1] == CONTEXT + 1 and blocks.dtype == np.int32
        assert keys == [f"{split}/00000/{index:06d}" for index in range(len(blocks))]
        stream = [token for name in names for token in encode_language(DOCUMENTS[name], "bytes") + [LANGUAGE_SEPARATOR]]
        width = CONTEXT + 1
        padded = stream + [LANGUAGE_PAD] * (-len(stream) % width)
        np.testing.assert_array_equal(blocks.ravel(), padded)  # only the final block is padded
        assert decode_language(blocks.ravel(), "bytes") == "".join(DOCUMENTS[name] + "\n\n" for name in names)


def test_statistics_and_counts_are_exact(bytes_run):
    run_dir, contract = bytes_run
    assigned = documents_by_split()
    width = CONTEXT + 1
    assert contract.modality == "language" and contract.class_names == () and contract.num_classes == 0
    assert contract.input_feature == "tokens"
    assert contract.input_spec == contract_lib.FeatureSpec("int64", (width,), "int64_list")
    statistics = contract.statistics
    assert (statistics["tokenizer"], statistics["vocab_size"], statistics["context_length"]) == ("bytes", 259, CONTEXT)
    for split, names in assigned.items():
        encoded = sum(len(DOCUMENTS[name].encode("utf-8")) for name in names)
        length = encoded + len(names)  # one separator per document
        blocks = math.ceil(length / width)
        assert contract.splits[split].count == blocks
        assert statistics["documents"][split] == len(names)
        assert statistics["bytes"][split] == encoded
        assert statistics["tokens"][split] == length - blocks  # each block's first token is no target
        stream = b"".join(DOCUMENTS[name].encode("utf-8") + b"|" for name in names)  # "|": the separator, 0 bytes
        first_tokens = stream[::width]
        assert statistics["target_bytes"][split] == encoded - sum(1 for byte in first_tokens if byte != ord("|"))
    assert contract.bad_examples == 2
    assert contract_lib.read_contract(run_dir) == contract


def test_bad_files_are_dead_letters_and_empty_or_hidden_files_are_not_documents(bytes_run):
    import json

    run_dir, contract = bytes_run
    assert contract.statistics["empty_files"] == 1  # empty.txt: read, skipped and counted (hidden files are not read)
    assert sum(contract.statistics["documents"].values()) == len(DOCUMENTS)
    folder = os.path.join(contract_lib.data_dir(run_dir), "dead_letter")
    letters = [json.loads(line) for name in os.listdir(folder) for line in open(os.path.join(folder, name))]
    reasons = {letter["key"]: letter["reason"] for letter in letters}
    assert sorted(reasons) == sorted(BAD)
    assert reasons["data/blob.bin"].startswith("binary file") and reasons["latin1.txt"].startswith("not UTF-8 text")


def test_a_file_name_that_is_not_utf8_is_read_and_a_utf16_file_is_named(tmp_path):
    """A name's undecodable bytes cannot travel as a Beam string: the task carries them as bytes and
    the key keeps them as \\xNN escapes. A UTF-16 file's and a broken link's dead letters say what they are."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for folder in (root, root / "sub"):
        with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as handle:
            handle.write("le café est noir\n".encode("utf-8") * 40)
    for index in range(8):
        (root / f"doc{index}.txt").write_text(f"document {index} " * 40)
    (root / "notepad.txt").write_text("saved as Unicode", encoding="utf-16")
    os.symlink(tmp_path / "moved-away.txt", root / "sub" / "link.txt")  # broken: was skipped without a word
    run_dir = str(tmp_path / "run")
    contract = preprocess(str(root), run_dir)
    assert contract.bad_examples == 2 and sum(contract.statistics["documents"].values()) == 10
    folder = os.path.join(contract_lib.data_dir(run_dir), "dead_letter")
    import json

    letters = [json.loads(line) for name in os.listdir(folder) for line in open(os.path.join(folder, name))]
    reasons = {letter["key"]: letter["reason"] for letter in letters}
    assert reasons == {
        "notepad.txt": "UTF-16 text (byte order mark FF FE), not UTF-8; save the file as UTF-8",
        "sub/link.txt": f"a broken symbolic link (to {tmp_path / 'moved-away.txt'}, which does not exist)"}


def test_a_rerun_writes_byte_identical_shards(bytes_run, corpus, tmp_path):
    run_dir, _ = bytes_run
    again = str(tmp_path / "again")
    preprocess(corpus, again)
    first, second = contract_lib.data_dir(run_dir), contract_lib.data_dir(again)
    names = sorted(name for name in os.listdir(first) if name.endswith(".tfrecord"))
    assert names == sorted(name for name in os.listdir(second) if name.endswith(".tfrecord")) and len(names) == 3
    for name in names + ["metadata.json"]:
        left, right = open(os.path.join(first, name), "rb").read(), open(os.path.join(second, name), "rb").read()
        assert left == right.replace(again.encode(), run_dir.encode()), name


def test_with_more_shards_each_packs_its_own_documents(corpus, tmp_path):
    run_dir = str(tmp_path / "sharded")
    contract = preprocess(corpus, run_dir, "data.num_shards=3")
    blocks, keys = read_blocks(run_dir, contract, "train")
    assert contract.splits["train"].num_shards == 3
    names = documents_by_split()["train"]
    for shard in range(3):
        mine = [name for name in names if int(splits.stable_fraction(name, "pack") * 3) == shard]
        rows = [row for row, key in zip(blocks, keys) if key.startswith(f"train/{shard:05d}/")]
        text = decode_language(np.concatenate(rows).ravel(), "bytes") if rows else ""
        assert text == "".join(DOCUMENTS[name] + "\n\n" for name in mine)
    assert contract.statistics["documents"]["train"] == len(names)


def test_characters_learn_the_train_vocabulary_and_mark_unseen_characters_unknown(characters_run):
    import collections

    run_dir, contract = characters_run
    assigned = documents_by_split()
    counts = collections.Counter("".join(DOCUMENTS[name] for name in assigned["train"]))
    expected = [token for token, _ in sorted(((t, c) for t, c in counts.items() if c >= 2),
                                             key=lambda item: (-item[1], item[0]))]
    vocabulary = contract_lib.language_vocabulary(run_dir)
    assert vocabulary == expected and "\n" in vocabulary  # escaped in vocab.txt, one token a line
    assert contract.statistics["vocab_size"] == len(expected) + contract_lib.LANGUAGE_RESERVED_IDS
    for split in ("train", "test"):
        blocks, _ = read_blocks(run_dir, contract, split)
        known = "".join("".join(character if character in vocabulary else "\ufffd" for character in DOCUMENTS[name])
                         + "\n\n" for name in assigned[split])
        assert decode_language(blocks.ravel(), "characters", vocabulary) == known
    assert "\ufffd" in known  # the test split holds characters the train split does not
    with open(os.path.join(contract_lib.data_dir(run_dir), "vocab.txt"), encoding="utf-8") as handle:
        assert "\\n\n" in handle.read()


def test_python_stdlib_plans_offline_with_a_stable_file_list():
    data = load_config([], ["data.source=python-stdlib"]).data
    plan = plan_source("python-stdlib", data)
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(name for name in os.listdir(root)
                   if name.endswith(".py") and os.path.isfile(os.path.join(root, name)))
    assert [name for name, _ in stdlib_files()] == names
    assert plan == plan_source("python-stdlib", data)
    assert (plan.modality, plan.estimated_count, plan.class_names) == ("language", len(names), ())
    assert 3e6 < plan.options["bytes"] < 8e6
    records = [record for task in plan.tasks for record in read_task(plan, task)]
    assert [record.key for record in records] == names and "os.py" in names
    limited = plan_source("python-stdlib", load_config([], ["data.source=python-stdlib", "data.limit=5"]).data)
    assert [record.key for task in limited.tasks for record in read_task(limited, task)] == names[:5]


def test_language_pairs_shift_the_block_by_one():
    block = tf.constant([[5, 6, 7, 2, 0]], tf.int32)
    inputs, targets = example_lib.language_pairs(block)
    assert inputs.numpy().tolist() == [[5, 6, 7, 2]] and targets.numpy().tolist() == [[6, 7, 2, 0]]


def test_bits_per_byte_divides_the_targets_loss_by_their_bytes(bytes_run):
    _, contract = bytes_run
    statistics = contract.statistics
    expected = 1.5 * statistics["tokens"]["validation"] / statistics["target_bytes"]["validation"] / math.log(2)
    assert contract_lib.bits_per_byte(1.5, contract, "validation") == pytest.approx(expected)
    # the bytes tokenizer has a target per byte and per separator: a little more than 1.5 nats per byte
    assert expected > 1.5 / math.log(2)


@functools.lru_cache(maxsize=None)
def codec(tokenizer: str):
    """(vocabulary, in-graph encoder) of each tokenizer, built once: tracing keras_hub's BPE takes seconds.
    The vocabulary: bpe, 40 merges learned from TRICKY and DOCUMENTS; characters, a fixed list."""
    vocabulary = None
    if tokenizer == "characters":
        vocabulary = list("abcdefghijklmnopqrstuvwxyz \n\tçé😀日本")
    if tokenizer == "bpe":
        counts = collections.Counter(word for text in [*TRICKY, *DOCUMENTS.values()] for word in bpe.pretokenize(text))
        vocabulary = bpe.merge_lines(bpe.learn_merges(counts, 40))
    return vocabulary, example_lib.LanguageEncoder(tokenizer, vocabulary)


@pytest.mark.parametrize("tokenizer", contract_lib.LANGUAGE_TOKENIZERS)
def test_in_graph_encoder_and_decoder_equal_the_python_codec_also_after_saving(tmp_path, tokenizer):
    vocabulary, encoder = codec(tokenizer)
    decoder = example_lib.LanguageDecoder(tokenizer, vocabulary)
    expected = [encode_language(text, tokenizer, vocabulary) for text in TRICKY]
    ragged = encoder(tf.constant(TRICKY))
    assert ragged.dtype == tf.int32 and ragged.to_list() == expected
    width = max(map(len, expected)) + 4
    rows = [ids + [LANGUAGE_SEPARATOR, 1, 999, -3] + [LANGUAGE_PAD] * (width - len(ids) - 4) for ids in expected]
    rows.append([3 + 0xE2, 3 + 0x82, 3 + ord("A"), 3 + 0xFF] + [LANGUAGE_PAD] * (width - 4))  # invalid UTF-8
    python = [decode_language(row, tokenizer, vocabulary) for row in rows]
    assert [text.decode("utf-8") for text in decoder(tf.constant(rows, tf.int32)).numpy()] == python
    assert python[1] == "hello\n\n\ufffd\ufffd\ufffd"  # separator, unknown, two out-of-range ids

    module = tf.Module()
    module.encoder, module.decoder = encoder, decoder
    module.round_trip = tf.function(lambda texts: decoder(encoder(texts).to_tensor(default_value=LANGUAGE_PAD)),
                                    input_signature=[tf.TensorSpec([None], tf.string)])
    if tokenizer != "bpe":  # saving keras_hub's BPE takes seconds: each bpe export does (tests/deploy/test_generate.py)
        tf.saved_model.save(module, str(tmp_path / "saved"))
        module = tf.saved_model.load(str(tmp_path / "saved"))
        assert module.encoder(tf.constant(TRICKY)).to_list() == expected
    trip = [text.decode("utf-8") for text in module.round_trip(tf.constant(TRICKY)).numpy()]
    assert trip == [decode_language(ids, tokenizer, vocabulary) for ids in expected]
    if tokenizer in ("bytes", "bpe"):
        assert trip == TRICKY  # nothing is out of vocabulary
    dataset = tf.data.Dataset.from_tensor_slices(TRICKY).batch(3).map(lambda texts: encoder(texts).to_tensor())
    rows = [row.tolist() for batch in dataset.as_numpy_iterator() for row in batch]
    assert [row[:len(ids)] for row, ids in zip(rows, expected)] == expected


# --- bpe ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_run(corpus, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("lm_bpe"))
    return run_dir, preprocess(corpus, run_dir, "data.tokenizer=bpe", "data.vocab_size=300")


def test_bpe_merges_are_learned_deterministically_most_frequent_pair_first():
    counts = {"aaab": 3, "ab": 2, " ab": 2, "ba": 1}
    # pairs: (a,a) 6, (a,b) 7, (" "->"Ġ",a) 2, (b,a) 1 -> ab first; then (a,a) 3 + (a,ab) 3: ties go to the
    # smaller pair, ("a", "a") < ("a", "ab"); then (a, ab) 3, (Ġ, ab) 2; (b, a) 1 is below min_count
    expected = [("a", "b"), ("a", "a"), ("aa", "ab"), ("Ġ", "ab")]
    assert bpe.learn_merges(counts, 10) == expected
    assert bpe.learn_merges(dict(reversed(list(counts.items()))), 10) == expected  # the order of the counts
    assert bpe.learn_merges(counts, 2) == expected[:2]
    assert bpe.learn_merges(counts, 10, min_count=1)[-1] == ("b", "a")
    encoder = bpe.Encoder(expected, 3)
    assert encoder.encode("aaab ab ba") == [259 + 2, 259 + 3, 3 + ord(" "), 3 + ord("b"), 3 + ord("a")]


def test_a_bpe_token_longer_than_255_bytes_counts_all_its_bytes():
    """Nine merges make one token of 512 `=`: bits per byte must divide by 512 bytes, not 512 % 256."""
    from pipeline.language import tokenize_document

    merges = bpe.merge_lines([("=" * 2 ** k, "=" * 2 ** k) for k in range(9)])
    _, (_, ids, target_bytes, size) = tokenize_document(("train", "doc", "=" * 512 + "\n"), "bpe", {"train": 1},
                                                        merges)
    assert ids.tolist() == [259 + 8, 3 + ord("\n"), LANGUAGE_SEPARATOR]
    assert target_bytes.tolist() == [512, 1, 0] and size == 513


def test_bpe_preprocess_learns_the_train_split_s_merges_and_packs_its_ids(bpe_run):
    import json

    run_dir, contract = bpe_run
    assigned = documents_by_split()
    counts = collections.Counter(word for name in assigned["train"] for word in bpe.pretokenize(DOCUMENTS[name]))
    merges = contract_lib.language_vocabulary(run_dir)
    # at most 300 - 259 merges; fewer here: the tiny corpus runs out of pairs seen twice (data.min_count)
    assert merges == bpe.merge_lines(bpe.learn_merges(counts, 300 - 259)) and 20 < len(merges) < 41
    assert contract.statistics["vocab_size"] == 259 + len(merges) and contract.statistics["tokenizer"] == "bpe"
    data_dir = contract_lib.data_dir(run_dir)
    with open(os.path.join(data_dir, "merges.txt"), encoding="utf-8") as handle:
        assert handle.read().splitlines() == ["#version: 0.2", *merges]  # GPT-2's merges.txt
    with open(os.path.join(data_dir, "vocab.json"), encoding="utf-8") as handle:
        ids = json.load(handle)
    assert ids["a"] == 3 + ord("a") and ids["Ġ"] == 3 + ord(" ")
    assert sorted(ids.values()) == list(range(3, 259 + len(merges)))
    pieces = contract_lib.language_pieces("bpe", merges)
    for split, names in assigned.items():
        blocks, _ = read_blocks(run_dir, contract, split)
        stream = [token for name in names for token in encode_language(DOCUMENTS[name], "bpe", merges) + [2]]
        np.testing.assert_array_equal(blocks.ravel(), stream + [LANGUAGE_PAD] * (-len(stream) % (CONTEXT + 1)))
        assert decode_language(blocks.ravel(), "bpe", merges) == "".join(DOCUMENTS[name] + "\n\n" for name in names)
        # bits per byte count bytes: each target id counts the bytes of its token, not 1 (separators 0)
        targets = blocks[:, 1:].ravel()
        assert contract.statistics["target_bytes"][split] == sum(len(pieces[token]) for token in targets if token > 2)
        assert contract.statistics["tokens"][split] == int((targets != LANGUAGE_PAD).sum())
    assert contract.statistics["tokens"]["train"] < contract.statistics["target_bytes"]["train"] * 0.8  # it merges


def test_bpe_needs_room_for_merges_and_language_data(corpus, tmp_path):
    with pytest.raises(Exception, match=r"^data.tokenizer: bpe learned no merges: no pair of bytes is seen "
                                        r"data.min_count=1000 times in the train split"):
        preprocess(corpus, str(tmp_path / "none"), "data.tokenizer=bpe", "data.min_count=1000")
    with pytest.raises(Exception, match=r"data.vocab_size: 259 leaves bpe no merges"):
        load_config([], ["data.source=python-stdlib", "data.tokenizer=bpe", "data.vocab_size=259"])
    with pytest.raises(Exception, match=r"data.tokenizer: 'bpe' is not for text classification"):
        load_config([], ["data.source=digits", "data.tokenizer=bpe"])


def test_a_corpus_of_empty_files_stops_preprocessing_by_name(tmp_path):
    """Nothing to learn from is a one-line error at preprocessing, not a traceback at training,
    and no metadata.json says the data is ready."""
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    (folder / "b.txt").write_text("")
    with pytest.raises(Exception, match=rf"^data.source: text:{folder} gave the train split no text to learn from "
                                        r"\(read 0 windows in all, 0 dead letters\): are its files empty\?$"):
        preprocess(str(folder), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "data" / "metadata.json").exists()


def test_bpe_in_graph_ids_equal_the_pipeline_s_on_random_text():
    """keras_hub's graph split and kcp/core/bpe.py's mirror of it, on strings of the characters
    where they could part: ASCII and unicode whitespace runs, contractions, digits, marks, NUL,
    U+096C (keras_hub's marker), U+0085 and U+2028 (whitespace to Python, not to RE2), emoji."""
    import random

    rng = random.Random(16)
    alphabet = [*" \t\n\r\x0b\x0c\x00\u00a0\u2009\u202f\u3000\u096c\u0085\u2028ab'sZ9٣é中😀.,:_()#\"", "'s", "'ll",
                "  ", "\n\n", "def"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(400)]
    merges, encoder = codec("bpe")
    assert encoder(tf.constant([text.encode("utf-8") for text in texts])).to_list() == \
        [encode_language(text, "bpe", merges) for text in texts]
    assert decode_language(encode_language("a\u096cb", "bpe", merges), "bpe", merges) == "ab"  # the marker goes
