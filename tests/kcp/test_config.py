import dataclasses
import os
import re

import pytest
import yaml

from kcp.core.config import Config, ConfigError, parse_override, read_yaml_file
from kcp.core.config_load import load_config


def test_defaults_build_and_round_trip_through_yaml():
    config = load_config()
    assert config.data.source == "digits"
    assert config.model.name == "cnn"
    again = load_config([yaml.safe_load(config.to_yaml())])
    assert again == config


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3


@pytest.mark.parametrize("text, expected", [
    ("train.epochs=3", {"train": {"epochs": 3}}),
    ("train.learning_rate=1e-2", {"train": {"learning_rate": 0.01}}),
    ("train.learning_rate=3.0E-4", {"train": {"learning_rate": 0.0003}}),
    ("export.name=1e", {"export": {"name": "1e"}}),
    ("model.filters=[16, 32]", {"model": {"filters": [16, 32]}}),
    ("model.batch_norm=false", {"model": {"batch_norm": False}}),
    ("data.source=digits", {"data": {"source": "digits"}}),
    ("export.min_accuracy=null", {"export": {"min_accuracy": None}}),
])
def test_parse_override_reads_yaml_scalars_and_lists(text, expected):
    assert parse_override(text) == expected


def test_overrides_apply_in_order_and_convert_types():
    config = load_config([], ["train.epochs=3", "train.epochs=5", "model.filters=[8,16,32]",
                              "train.learning_rate=1"])
    assert config.train.epochs == 5
    assert config.model.filters == (8, 16, 32)
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)


def test_layers_take_precedence_in_order():
    config = load_config([{"train": {"epochs": 7, "batch_size": 16}}, {"train": {"epochs": 9}}],
                         ["train.batch_size=32"])
    assert (config.train.epochs, config.train.batch_size) == (9, 32)


@pytest.mark.parametrize("override, message", [
    ("model.name=nope", "model.name: 'nope' is not one of cnn, "),  # and the other registered families
    ("train.epochs=0", "train.epochs: 0 is below the minimum 1"),
    ("train.epochs=two", "train.epochs: 'two' is not an integer"),
    ("train.epochs=2.5", "train.epochs: 2.5 is not an integer"),
    ("train.epoch=3", "train.epoch: unknown key; did you mean epochs? allowed: epochs,"),
    ("trian.epochs=3", "trian: unknown section; did you mean train? allowed: data, model, train, tune, export"),
    ("train.zzz=3", "train.zzz: unknown key; allowed: epochs,"),  # nothing close: no guess
    ("model.batch_norm=maybe", "model.batch_norm: 'maybe' is not a boolean"),
    ("model.dropout=1.5", "model.dropout: 1.5 is above the maximum 0.95"),
    ("train.learning_rate=0", "train.learning_rate: 0.0 must be above 0"),
    ("data.split=[0.5, 0.2]", "data.split: [0.5, 0.2] must be three fractions"),
    ("data.split=[0.5, 0.2, 0.2]", "data.split: [0.5, 0.2, 0.2] must be three fractions"),
    ("data.compression=zip", "data.compression: 'zip' is not one of none, gzip"),
    ("data.image_size=[5000, 10]", "data.image_size: [5000, 10] is above 4096 pixels a side"),  # was killed, OOM
    ("model.augment.flip=true", "model.augment.flip: True is not a string; allowed: none, horizontal, vertical, "
                                "horizontal_and_vertical"),  # YAML's true for a key of choices
    ("export.name=a/b", "export.name: 'a/b' must be a plain directory name"),
    ("train=3", "expected section.key=value"),
    ("model.filters=[1, [2]]", "model.filters: [1, [2]] is not a list of values"),
])
def test_bad_values_fail_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as raised:
        load_config([], [override])
    text = str(raised.value)
    assert message in text
    assert "\n" not in text


def test_a_section_that_is_not_a_mapping_is_rejected():
    with pytest.raises(ConfigError, match="^train: expected a mapping"):
        load_config([{"train": 3}])


def test_read_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 4\nmodel:\n  filters: [8]\n")
    config = load_config([read_yaml_file(str(path))])
    assert config.train.epochs == 4 and config.model.filters == (8,)


def test_read_yaml_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        read_yaml_file(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        read_yaml_file(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="scalar.yaml: expected a mapping"):
        read_yaml_file(str(scalar))
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 2\n  epochs: 3\nmodel: {name: cnn}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML \(found duplicate key 'epochs' \(line 3\)"):
        read_yaml_file(str(twice))
    twice.write_text("train:\n  epochs: 2\ndata: {}\ntrain:\n  seed: 1\n")  # a whole section twice
    with pytest.raises(ConfigError, match="found duplicate key 'train' \\(line 4\\)"):
        read_yaml_file(str(twice))
    from kcp.core.schema import load_yaml

    merged = load_yaml("base: &b {epochs: 2, seed: 1}\ntrain:\n  <<: *b\n  epochs: 3\n")
    assert merged["train"] == {"epochs": 3, "seed": 1}  # YAML merge keys still merge; a key given wins
    load_yaml("{1: a, true: b}")  # two keys of two types, not a duplicate (a Python dict then holds one)


def test_a_bad_value_in_the_runs_config_yaml_names_that_file(tmp_path):
    from kcp.core.config_load import resolve_config

    (tmp_path / "config.yaml").write_text("train:\n  epochs: abc\n")
    recorded = str(tmp_path / "config.yaml")
    with pytest.raises(ConfigError) as error:
        resolve_config(str(tmp_path))
    assert str(error.value) == f"{recorded}: train.epochs: 'abc' is not an integer"
    assert resolve_config(str(tmp_path), overrides=["train.epochs=4"]).train.epochs == 4  # overridden: fine
    with pytest.raises(ConfigError) as error:  # a bad value the user typed is named as typed, not as the file's
        resolve_config(str(tmp_path), overrides=["train.epochs=4", "train.seed=x"])
    assert str(error.value).startswith("train.seed: ")


def test_a_bad_key_or_value_in_the_config_file_names_that_file(tmp_path):
    """`--config my.yaml` with a misspelt key or a bad value: the error named neither the file
    nor a guess, so a user who had typed no `--set` looked for it on the command line."""
    from kcp.core.config_load import resolve_config

    path = tmp_path / "my.yaml"
    path.write_text("data:\n  text_colum: body\n")
    with pytest.raises(ConfigError) as error:
        resolve_config(None, str(path))
    assert str(error.value).startswith(f"{path}: data.text_colum: unknown key; did you mean text_column? allowed: ")
    path.write_text("train:\n  epochs: abc\n")
    with pytest.raises(ConfigError) as error:
        resolve_config(None, str(path))
    assert str(error.value) == f"{path}: train.epochs: 'abc' is not an integer"
    assert resolve_config(None, str(path), overrides=["train.epochs=4"]).train.epochs == 4
    with pytest.raises(ConfigError) as error:  # the value typed on the command line is not the file's
        resolve_config(None, str(path), overrides=["train.epochs=0"])
    assert str(error.value) == "train.epochs: 0 is below the minimum 1"


def test_every_section_is_present():
    assert [f.name for f in dataclasses.fields(Config)] == ["data", "model", "train", "tune", "export"]



def test_the_model_section_is_flat_and_validated_by_the_chosen_family():
    config = load_config([], ["model.name=resnet", "model.depth=56", "model.dropout=0.2"])
    assert (config.model.depth, config.model.dropout, config.model.version) == (56, 0.2, 1)
    plain = config.to_dict()["model"]
    assert plain["depth"] == 56 and "filters" not in plain and "family" not in plain
    assert load_config([config.to_dict()]) == config


def test_a_key_of_another_family_is_an_error_naming_the_allowed_keys():
    with pytest.raises(ConfigError) as raised:
        load_config([], ["model.depth=20"])  # the default family is cnn
    assert str(raised.value).startswith("model.depth: not a key of the cnn family; allowed: name, dropout,")
    assert "filters" in str(raised.value) and "\n" not in str(raised.value)


def test_a_recorded_config_keeps_its_family_keys_until_the_family_changes():
    recorded = load_config([], ["model.filters=[8]", "train.epochs=4"]).to_dict()
    same = load_config([], ["model.kernel_size=5"], base=recorded)
    assert (same.model.filters, same.model.kernel_size, same.train.epochs) == ((8,), 5, 4)
    other = load_config([{"model": {"name": "rnn"}}], [], base=recorded)
    assert (other.model.name, other.model.units, other.train.epochs) == ("rnn", 128, 4)
    with pytest.raises(ConfigError, match="model.filters: not a key of the rnn family"):
        load_config([{"model": {"name": "rnn", "filters": [8]}}], [], base=recorded)


def test_a_recorded_config_drops_the_earlier_sources_own_keys_when_the_source_changes():
    """An npz's data.modality (or a table's columns, a quick trial's limit) described that source:
    a later stage naming another source does not read the new one with them; the same source keeps them,
    and the keys that are choices for any source (split, seed, vocabulary) stay."""
    recorded = load_config([{"data": {"source": "npz:x.npz"}}],
                           ["data.modality=sequence", "data.limit=200", "data.text_column=review",
                            "data.image_size=[16, 16]", "data.seed=7", "data.vocab_size=500"]).to_dict()
    same = load_config([{"data": {"source": "npz:x.npz"}}], [], base=recorded).data
    assert (same.modality, same.limit, same.text_column, same.image_size) == ("sequence", 200, "review", (16, 16))
    other = load_config([{"data": {"source": "npz:img.npz"}}], [], base=recorded).data
    assert (other.modality, other.limit, other.text_column, other.image_size) == (None, 0, "text", None)
    assert (other.seed, other.vocab_size) == (7, 500)
    given = load_config([{"data": {"source": "csv:t.csv"}}], ["data.text_column=body"], base=recorded).data
    assert (given.text_column, given.limit) == ("body", 0)
    assert load_config([], [], base=recorded).data.modality == "sequence"  # no source named: the run's own


def test_family_rules_are_checked_by_the_family():
    with pytest.raises(ConfigError, match=r"model.dim: 30 is not divisible by model.heads \(4\)"):
        load_config([], ["model.name=transformer", "model.dim=30", "model.heads=4"])
    with pytest.raises(ConfigError, match="model.depth: 21 is not a ResNet depth"):
        load_config([], ["model.name=resnet", "model.depth=21"])


@pytest.fixture
def gpt_family():
    """model.name: gpt, registered by the trainer's model registry (a language family)."""
    import trainer.models

    assert "language" in trainer.models.MODEL_FAMILIES["gpt"].modalities


def test_gpt_without_a_source_reads_the_python_stdlib_with_bytes(gpt_family, tmp_path):
    from kcp.core.config_load import record_config, resolve_config

    config = resolve_config(str(tmp_path), model="gpt")
    assert (config.data.source, config.data.tokenizer, config.data.context_length) == ("python-stdlib", "bytes", 256)
    record_config(str(tmp_path), config)
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]
    assert (recorded["source"], recorded["tokenizer"]) == ("python-stdlib", "bytes")  # the applied values
    assert load_config([], ["model.name=gpt", "data.source=text:corpus/"]).data.source == "text:corpus/"
    assert load_config([], ["model.name=gpt", "data.source=digits"]).data.source == "digits"  # a user's choice stays
    # text classification's default: punctuation marks are tokens (code, identifiers, lines of punctuation)
    assert load_config().data.tokenizer == "words_and_punctuation"
    assert load_config([], ["data.tokenizer=words"]).data.tokenizer == "words"  # the old default, by choice
    assert load_config([], ["data.source=text:c", "data.tokenizer=characters"]).data.tokenizer == "characters"


def test_a_corpus_without_a_model_trains_gpt_and_a_family_that_cannot_take_the_data_is_refused(gpt_family, tmp_path):
    from kcp.cli import main

    assert load_config([], ["data.source=text:notes/"]).model.name == "gpt"  # as gpt without a source: a corpus
    assert load_config([], ["data.source=python-stdlib"]).model.name == "gpt"
    assert load_config([], ["data.source=text:notes/", "model.name=cnn"]).model.name == "cnn"  # asked for: kept
    assert load_config([], ["data.source=digits"]).model.name == "cnn"
    # a run directory that recorded one kind of source and family, given the other kind and no model
    digits, corpus = load_config([], ["data.source=digits"]).to_dict(), load_config([], ["data.source=text:n/"]).to_dict()
    switched = load_config([], ["data.source=text:notes/"], base=digits)
    assert (switched.model.name, switched.train.optimizer) == ("gpt", "adamw")  # gpt's own defaults, not cnn's adam
    assert load_config([], ["data.source=digits"], base=corpus).model.name == "cnn"
    assert load_config([], ["train.epochs=3"], base=corpus).model.name == "gpt"  # no switch: the recorded family
    run_dir = str(tmp_path / "run")  # refused at planning, before the pipeline runs and before config.yaml
    assert main(["preprocess", "--run-dir", run_dir, "--source", "digits", "--model", "gpt"]) == 2
    assert not os.path.exists(os.path.join(run_dir, "config.yaml")) and not os.path.exists(os.path.join(run_dir, "data"))


@pytest.mark.parametrize("override, source, message", [
    ("data.tokenizer=words", "python-stdlib", "data.tokenizer: 'words' is not for language data (data.source "
                                              "'python-stdlib'); allowed: bytes, characters"),
    ("data.tokenizer=words_and_punctuation", "text:c", "allowed: bytes, characters"),
    ("data.tokenizer=bytes", "csv:t.csv", "data.tokenizer: 'bytes' is not for text classification (data.source "
                                          "'csv:t.csv'); allowed: words, words_and_punctuation, characters"),
    ("data.context_length=4", "python-stdlib", "data.context_length: 4 is below the minimum 8"),
    ("data.augment.copies=1", "python-stdlib", "data.augment.copies: 1 augmented copies are not made of language"),
])
def test_language_settings_are_checked_with_one_line(override, source, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config([], [f"data.source={source}", override])
    assert "\n" not in str(error.value)


def test_a_recorded_tokenizer_is_dropped_when_the_source_changes_kind(gpt_family, tmp_path):
    from kcp.core.config_load import record_config, resolve_config

    record_config(str(tmp_path), resolve_config(str(tmp_path), model="gpt"))
    config = resolve_config(str(tmp_path), source="csv:t.csv", model="cnn")
    assert (config.data.source, config.data.tokenizer) == ("csv:t.csv", "words_and_punctuation")
    assert resolve_config(str(tmp_path)).data.source == "python-stdlib"  # the recorded source is the user's now


def test_a_notebooks_dataframe_or_array_as_source_is_one_line(tmp_path):
    """Their truth value raised pandas' and NumPy's own ValueError ("ambiguous") from `if source:`."""
    import numpy as np
    import pandas as pd

    from kcp import api

    for data, kind in ((pd.DataFrame({"text": ["a"], "label": ["x"]}), "DataFrame"), (np.zeros((3, 8, 8)), "ndarray")):
        with pytest.raises(ConfigError) as raised:
            api.preprocess(str(tmp_path / "run"), data)
        assert str(raised.value) == (f"data.source: expected a source such as csv:PATH or npz:PATH, got a {kind} "
                                     "(save it first, e.g. DataFrame.to_csv or numpy.savez)")
    assert not os.path.exists(tmp_path / "run" / "config.yaml")


def test_a_characters_vocabulary_with_no_room_for_a_character_is_refused(gpt_family):
    """data.vocab_size 3 gave an empty vocab.txt: every character unknown, and nothing said."""
    with pytest.raises(ConfigError, match=r"^data.vocab_size: 3 leaves the characters tokenizer no character "):
        load_config([], ["data.source=text:notes", "data.tokenizer=characters", "data.vocab_size=3"])
    assert load_config([], ["data.source=text:notes", "data.tokenizer=characters", "data.vocab_size=4"]).data.vocab_size == 4
