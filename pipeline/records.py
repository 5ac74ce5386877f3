"""Per-record work of the preprocessing pipeline: decode -> split -> augment -> encode, as plain
functions (testable without Beam) that tag what they return."""

from __future__ import annotations

from kcp.core import example_proto
from kcp.core.beamio import DEAD_LETTER, EXAMPLE, dead_letter
from kcp.core.sources import BadInput, RawExample, SourcePlan, SourceRecord, decode_record
from pipeline import augment as augment_lib

ANALYZE = "analyze"  # a train original, for the full-pass statistics
AUGMENTED = "augmented"  # the number of copies made of one example


def decode_or_dead_letter(record: SourceRecord, plan: SourcePlan, class_names=None):
    """SourceRecord -> (EXAMPLE, RawExample), or (DEAD_LETTER, json line) with the reason."""
    try:
        return EXAMPLE, decode_record(plan, record, class_names)
    except BadInput as error:
        return DEAD_LETTER, dead_letter(record.key, plan.uri, str(error))
    except Exception as error:  # noqa: BLE001  an unforeseen failure on one input is its dead letter
        return DEAD_LETTER, dead_letter(record.key, plan.uri, f"unexpected {type(error).__name__}: {error}")


def encode_or_dead_letter(example: RawExample, plan: SourcePlan, label_index: dict):
    """RawExample -> (EXAMPLE, (key, serialized tf.train.Example)), or a dead letter."""
    label = label_index.get(example.label)
    if label is None:
        return DEAD_LETTER, dead_letter(example.key, plan.uri, f"unknown label {example.label!r}")
    try:
        serialized = example_proto.encode_example(plan.input_spec, plan.input_feature, example.key, example.inputs, label)
    except ValueError as error:
        return DEAD_LETTER, dead_letter(example.key, plan.uri, str(error))
    return EXAMPLE, (example.key, serialized)


def with_augmented_copies(example: RawExample, modality: str, config):
    """The example itself, then its `config.copies` augmented copies."""
    yield example
    for key, inputs in augment_lib.augmented_copies(example.key, example.inputs, modality, config):
        yield RawExample(key, inputs, example.label, example.split)


def process_record(record: SourceRecord, plan: SourcePlan, assign, label_index: dict, augment_config):
    """One source record through decode -> split -> augment (train only) -> encode, in one step.

    Yields tagged items: (DEAD_LETTER, json line) for a record or copy that cannot be used;
    (ANALYZE, RawExample) for each train original (the full-pass statistics); (split,
    (key, serialized Example)) for the example and its copies; (AUGMENTED, copies made).
    One fused step instead of a chain of Map/Filter steps: Beam's per-element cost is paid
    once per record, not once per step.
    """
    tag, example = decode_or_dead_letter(record, plan, label_index)
    if tag == DEAD_LETTER:
        yield tag, example
        return
    split = assign(example)
    examples = [example]
    if split == "train":
        yield ANALYZE, example
        if augment_config.copies:
            examples = list(with_augmented_copies(example, plan.modality, augment_config))
            yield AUGMENTED, len(examples) - 1
    for item in examples:
        tag, value = encode_or_dead_letter(item, plan, label_index)
        yield (split if tag == EXAMPLE else tag), value
