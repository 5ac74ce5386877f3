"""From what the pipeline measured to the data contract: split counts and shard files, the
statistics and vocabulary, and the closing counts table."""

from __future__ import annotations

import dataclasses
import unicodedata

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from kcp.core import contract as contract_lib
from kcp.core.config import Config
from kcp.core.sources import SourcePlan
from pipeline import splits
from pipeline.analysis import length_percentiles
from pipeline.shards import shard_name, shard_pattern


def counts_table(contract, read: int, bad: int, augmented: int) -> list[str]:
    """The closing table: read, bad, written per split, augmented copies."""
    rows = [("read", read), ("bad", bad)]
    if contract.statistics.get("empty_files"):  # language: files with no text, skipped
        rows.append(("empty (skipped)", contract.statistics["empty_files"]))
    rows += [(f"{split} written", info.count) for split, info in contract.splits.items()]
    rows.append(("augmented copies", augmented))
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {value:>9,}" for name, value in rows]


def empty_validation_warning(contract, config: Config) -> str | None:
    """A warning line when the validation split came out empty (a small source, or an unlucky key
    hash) although data.split gives it a share: the trainer then monitors its train metrics."""
    counts = {split: info.count for split, info in contract.splits.items()}
    if counts.get("validation", 0) or not config.data.split[1]:  # not empty, or left empty on purpose
        return None
    written = ", ".join(f"{split} {count}" for split, count in counts.items())
    fix = "set data.split to a larger validation share, or add data"
    if contract.modality == "language":  # documents go whole to one split: a share cannot divide one
        documents = contract.statistics.get("documents") or {}
        total = sum(documents.values())
        fix = (f"each file is one document and goes whole to one split ({total} document{'' if total == 1 else 's'}): "
               "split the text into more files, or add files")
    return (f"warning: the validation split is empty ({written} examples written, data.split "
            f"{list(config.data.split)}): early stopping, the best checkpoint and plateau will monitor the train "
            f"metrics; {fix}")


def untrained_classes_warning(contract) -> str | None:
    """A warning line naming the classes with no train example (a class folder only under test/,
    `Cat/` beside `cat/`, a rare label hashed into another split): the model cannot learn them, and
    their other examples count as errors."""
    counts = contract.statistics.get("class_counts") or {}
    missing = [name for name in contract.class_names if not counts.get(name)]
    if not missing or not contract.splits["train"].count:
        return None
    folded = {}
    for name in contract.class_names:
        folded.setdefault(name.casefold(), []).append(name)
    clashes = [" and ".join(names) for names in folded.values() if len(names) > 1 and set(names) & set(missing)]
    hint = f" ({'; '.join(clashes)} differ only in case)" if clashes else ""
    shown = ", ".join(repr(name) for name in missing[:10])
    shown += f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return (f"warning: {len(missing)} of {len(contract.class_names)} classes have no train example: {shown}{hint}; "
            "the model cannot learn them and predicts another class for their examples; add train examples, "
            "or merge or drop those labels")


def lookalike_classes_warning(contract) -> str | None:
    """A warning line naming class names that print alike but differ in Unicode normalization (a
    folder `café` in NFC beside one copied from macOS in NFD) or only in case (`Cat/` beside `cat/`,
    labels `pos` and `Pos`): they are separate classes."""
    groups = {}
    for name in contract.class_names:
        groups.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(name)
    alike = [names for names in groups.values() if len(names) > 1]
    if not alike:
        return None
    forms = {len({unicodedata.normalize("NFC", name) for name in names}) == 1 for names in alike}
    how = ("Unicode normalization (NFC, NFD)" if forms == {True} else
           "case" if not any(unicodedata.normalize("NFC", n) != n for names in alike for n in names) else
           "case or Unicode normalization")
    shown = "; ".join(" and ".join(ascii(name) for name in names) for names in alike)
    return (f"warning: classes {shown} differ only in {how}, so they are separate classes; rename them to one "
            "spelling if they are one class")


def imbalanced_classes_warning(contract) -> str | None:
    """A warning line when the train split's classes are far from even (the most common class holds
    80% or more, or ten times the least common): accuracy then flatters a model that answers the
    common class, so the line gives that class's accuracy to compare with."""
    counts = {name: count for name, count in (contract.statistics.get("class_counts") or {}).items() if count}
    total = sum(counts.values())
    if len(counts) < 2 or not total:
        return None
    common, rare = max(counts, key=counts.get), min(counts, key=counts.get)
    if counts[common] < 0.8 * total and counts[common] < 10 * counts[rare]:
        return None
    return (f"warning: the train split's classes are imbalanced: {common!r} has {counts[common]} of {total} "
            f"examples ({counts[common] / total:.1%}), {rare!r} {counts[rare]} ({counts[rare] / total:.1%}); a model "
            f"that always answers {common!r} scores about {counts[common] / total:.4f} accuracy: judge accuracy "
            "against that, and the report's per-class recall")


def sparse_classes_warning(contract) -> str | None:
    """A warning line when there are fewer than 2 train examples a class (10 classes or more): labels
    that are a continuous value (a regression target: every value its own class), an id or free text,
    not classes. A classifier cannot learn a class from one example."""
    names, counts = contract.class_names, contract.statistics.get("class_counts") or {}
    train = sum(counts.values())
    if len(names) < 10 or train >= 2 * len(names):
        return None
    fractional = sum(1 for name in names if _is_fraction(name))
    what = ("a continuous value (a regression target: kcp trains classifiers, so bin it into classes first)"
            if fractional > len(names) / 2 else "an id or free text rather than classes (data.label_column)")
    return (f"warning: {len(names)} classes for {train} train examples, fewer than 2 a class on average "
            f"(e.g. {', '.join(repr(name) for name in names[:3])}): a classifier cannot learn a class from one "
            f"example; are the labels {what}?")


def _is_fraction(text: str) -> bool:
    """True for a number that is not a whole one ('0.53', '-1e-3'), as a continuous label reads."""
    try:
        value = float(text)
    except ValueError:
        return False
    return value == value and not value.is_integer()


def contract_from_summary(plan: SourcePlan, config: Config, summary: dict, data_dir: str):
    """Assembles the contract (and the vocabulary, for text) from what the pipeline measured."""
    split_infos = {}
    for split in splits.SPLITS:
        shards = [s for s in summary["shards"] if s["split"] == split]
        num_shards = summary["facts"]["num_shards"][split]
        written = {s["shard"] for s in shards}
        for shard in range(num_shards):
            if shard not in written:
                write_empty_shard(data_dir, shard_name(split, shard, num_shards, config.data.compression))
        split_infos[split] = contract_lib.SplitInfo(
            count=sum(s["count"] for s in shards),
            num_shards=num_shards,
            file_pattern=shard_pattern(split, num_shards, config.data.compression),
        )
    class_names = tuple(summary["facts"]["class_names"])
    class_counts = summary.get("class_counts", {})
    statistics = {"class_counts": {name: class_counts.get(name, 0) for name in class_names}}
    vocabulary = None
    if plan.modality == "text":
        vocabulary = summary.get("vocabulary", [])
        percentiles = length_percentiles(summary.get("length_counts", {})) or {"p95": 1}
        statistics.update({
            "tokenizer": config.data.tokenizer,  # the trainer and the export tokenize as the vocabulary was made
            "vocab_size": len(vocabulary) + contract_lib.RESERVED_TOKEN_IDS,
            "max_length": int(config.data.max_length or max(1, percentiles["p95"])),
            "length_percentiles": percentiles,
        })
        characters = length_percentiles(summary.get("character_length_counts", {})) or {"p95": 1}
        if config.data.char_ngrams:  # the trainer and the export hash the same n-grams of the same characters
            statistics.update({
                "char_ngrams": config.data.char_ngrams,
                "char_ngram_buckets": config.data.char_ngram_buckets,
                "max_characters": int(config.data.max_characters or max(1, characters["p95"])),
            })
        statistics["character_percentiles"] = characters
    else:
        channel_stats = summary.get("channel_stats", {"mean": [], "std": []})
        statistics.update({"mean": channel_stats["mean"], "std": channel_stats["std"]})
    contract = contract_lib.DataContract(
        modality=plan.modality,
        input_feature=plan.input_feature,
        input_spec=plan.input_spec,
        class_names=class_names,
        splits=split_infos,
        statistics=statistics,
        compression=config.data.compression,
        source=plan.uri,
        bad_examples=summary["dead_letters"],
        augmentation={"copies": config.data.augment.copies, **(
            dataclasses.asdict(config.data.augment) if config.data.augment.copies else {})},
    )
    return contract, vocabulary


def write_empty_shard(directory: str, name: str) -> None:
    """A shard no key hashed to: an empty TFRecord file, so every NNNNN-of-MMMMM exists."""
    compression = CompressionTypes.GZIP if name.endswith(".gz") else CompressionTypes.UNCOMPRESSED
    with FileSystems.create(FileSystems.join(directory, name), compression_type=compression):
        pass
