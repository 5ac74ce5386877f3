"""Language-modelling data (modality `language`): documents -> token stream -> fixed blocks.

    kcp preprocess --run-dir runs/lm --source python-stdlib --set model.name=gpt

    Read (file paths) -> Decode (UTF-8 text, bad files to dead letters) -> Split (stable hash of
    the document key) -> [characters: CountCharacters over train -> vocabulary | bpe: CountWords
    over train -> LearnMerges] -> Tokenize (ids + LANGUAGE_SEPARATOR per document) -> GroupByShard
    -> Pack (sort by key, concatenate, cut into blocks of context_length + 1, pad the last) -> Write
    (one TFRecord shard per group)

Packing is an ordering: a block holds the end of one document and the start of the next, so
the documents of a packing group must meet in one place, in a fixed order (sorted by key:
byte-identical reruns on any runner). Each split is packed in `pack_groups` groups, one per
shard: a document goes to the group of the stable hash of its key. A split's group count comes
from the listed bytes (one group per PACK_GROUP_BYTES of text, or `data.num_shards`), so one
worker holds at most about that much text (tokens as int32 NumPy arrays: 4 bytes per token)
however large the corpus. Each group's last block is padded with LANGUAGE_PAD: with the
default a split under PACK_GROUP_BYTES is one group, and only its final block is padded;
a larger split pads one block per 32 MiB of text (a negligible share).
"""

from __future__ import annotations

import collections
import functools
import math

import apache_beam as beam
import numpy as np

from kcp.core import bpe
from kcp.core import contract as contract_lib
from kcp.core import example_proto
from kcp.core import storage
from kcp.core.beamio import DEAD_LETTER, CountProgress, ReadSource, select
from kcp.core.config import Config, DataConfig
from kcp.core.errors import UserError
from kcp.core.layout import DEAD_LETTER_DIR, MERGES_FILE, VOCABULARY_JSON_FILE
from kcp.core.sources import SourcePlan
from pipeline import splits
from pipeline.analysis import select_vocabulary, write_summary
from pipeline.records import decode_or_dead_letter
from pipeline.shards import MAX_SHARDS, shard_name, shard_pattern, write_records
from pipeline.summary import write_empty_shard

PACK_GROUP_BYTES = 32 * 2**20  # text per packing group (and shard) of a split
DOCUMENT = "document"
SPLIT_STATISTICS = ("documents", "bytes", "tokens", "target_bytes")  # per split, summed over its shards


def pack_groups(plan: SourcePlan, data: DataConfig) -> dict:
    """Packing groups (= shards) per split: `data.num_shards`, else one per PACK_GROUP_BYTES of
    the split's expected share of the listed bytes, at least 1."""
    if data.num_shards:
        return {split: data.num_shards for split in splits.SPLITS}
    total = plan.options.get("bytes", 0)
    return {split: int(min(MAX_SHARDS, max(1, math.ceil(total * fraction / PACK_GROUP_BYTES))))
            for split, fraction in zip(splits.SPLITS, data.split)}


def decode_and_split(record, plan: SourcePlan, fractions, seed):
    """A record -> (DOCUMENT, (split, key, text)), or a dead letter; an empty file yields nothing."""
    tag, value = decode_or_dead_letter(record, plan)
    if tag == DEAD_LETTER:
        yield tag, value
    elif value.inputs:
        yield DOCUMENT, (splits.stable_split(value.key, fractions, seed), value.key, value.inputs)


class CharacterCountsFn(beam.CombineFn):
    """Counts of every character of the train documents; one Counter per worker, not one element per character."""

    def create_accumulator(self):
        return collections.Counter()

    def add_input(self, accumulator, document):
        accumulator.update(document[2])
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = collections.Counter()
        for counts in accumulators:
            merged.update(counts)
        return merged

    def extract_output(self, accumulator):
        return dict(accumulator)


class WordCountsFn(CharacterCountsFn):
    """Counts of the words (`bpe.pretokenize`) of the train documents, for learning BPE merges."""

    def add_input(self, accumulator, document):
        accumulator.update(bpe.pretokenize(document[2]))
        return accumulator


def learn_merges(word_counts: dict, max_merges: int, min_count: int) -> list[str]:
    """The bpe vocabulary: merges.txt's lines, at most `max_merges` (data.vocab_size less the 259
    reserved and byte ids), each pair seen at least `min_count` times. Learned in one place from
    the summed counts, with ties broken by the pair itself: reruns give the same merges."""
    return bpe.merge_lines(bpe.learn_merges(word_counts, max_merges, min_count))


def select_characters(counts: dict, max_tokens: int, min_count: int) -> list[str]:
    """The vocabulary of the characters tokenizer: the most frequent characters seen at least
    `min_count` times, at most `max_tokens` (data.vocab_size less the reserved ids)."""
    return select_vocabulary([item for item in counts.items() if item[1] >= min_count], max_tokens)


def utf8_lengths(text: str) -> np.ndarray:
    """The UTF-8 length of each character of `text` (uint8)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return (1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)).astype(np.uint8)


def tokenize_document(document, tokenizer: str, groups: dict, vocabulary=None):
    """(split, key, text) -> ((split, group), (key, ids, target bytes per id, UTF-8 bytes)).

    ids: `encode_language` then LANGUAGE_SEPARATOR (int32); target bytes per id: what each id
    encodes (1 per byte id, the character's UTF-8 length, the token's bytes for bpe, 0 for the
    separator), for bits per byte: a bpe token of 4 bytes counts 4.
    """
    split, key, text = document
    ids = np.asarray(contract_lib.encode_language(text, tokenizer, vocabulary) + [contract_lib.LANGUAGE_SEPARATOR],
                     dtype=np.int32)
    if tokenizer == "bytes":
        lengths = np.ones(len(ids) - 1, np.uint8)
    elif tokenizer == "bpe":
        lengths = bpe_piece_lengths(tuple(vocabulary))[ids[:-1]]
    else:
        lengths = utf8_lengths(text)
    group = int(splits.stable_fraction(key, "pack") * groups[split])
    return (split, group), (key, ids, np.append(lengths, 0).astype(lengths.dtype), len(text.encode("utf-8")))


@functools.lru_cache(maxsize=4)
def bpe_piece_lengths(lines: tuple) -> np.ndarray:
    """The bytes each bpe id encodes (int32, indexed by id; 0 for the reserved ids): a token may be
    longer than 255 bytes (a run of `=` or spaces repeated across a corpus merges on and on)."""
    pieces = contract_lib.language_pieces("bpe", list(lines))
    return np.array([0] * contract_lib.LANGUAGE_RESERVED_IDS + [len(piece) for piece in
                                                                pieces[contract_lib.LANGUAGE_RESERVED_IDS:]], np.int32)


def pack_blocks(documents, context_length: int):
    """Documents (key, ids, target bytes per id, bytes) -> (blocks int32 (n, context_length + 1),
    statistics): sorted by key, concatenated, cut into blocks, the last padded with LANGUAGE_PAD.

    statistics: documents, bytes (UTF-8 of the documents), tokens (non-pad targets: block[1:]),
    target_bytes (the UTF-8 bytes those targets encode).
    """
    documents = sorted(documents, key=lambda document: document[0])
    width = context_length + 1
    stream = np.concatenate([ids for _, ids, _, _ in documents]) if documents else np.zeros(0, np.int32)
    lengths = np.concatenate([sizes for _, _, sizes, _ in documents]) if documents else np.zeros(0, np.uint8)
    count = -(-len(stream) // width)
    blocks = np.full(count * width, contract_lib.LANGUAGE_PAD, np.int32)
    blocks[:len(stream)] = stream
    blocks = blocks.reshape(count, width)
    block_bytes = np.zeros(count * width, np.int64)
    block_bytes[:len(lengths)] = lengths
    statistics = {
        "documents": len(documents),
        "bytes": int(sum(size for _, _, _, size in documents)),
        "tokens": int((blocks[:, 1:] != contract_lib.LANGUAGE_PAD).sum()),
        "target_bytes": int(block_bytes.reshape(count, width)[:, 1:].sum()),
    }
    return blocks, statistics


class _PackShardFn(beam.DoFn):
    """One packing group -> one TFRecord shard of blocks, keyed "SPLIT/SHARD/BLOCK" in stream order;
    outputs the shard's summary (block count and the SPLIT_STATISTICS)."""

    def __init__(self, directory: str, groups: dict, context_length: int, compression: str, input_feature: str):
        self._directory, self._groups, self._context_length = directory, groups, context_length
        self._compression, self._input_feature = compression, input_feature

    def process(self, group_and_documents):
        (split, group), documents = group_and_documents
        blocks, statistics = pack_blocks(list(documents), self._context_length)
        name = shard_name(split, group, self._groups[split], self._compression)
        final = storage.join(self._directory, name)
        write_records(final, (example_proto.encode_language_block(self._input_feature, f"{split}/{group:05d}/{index:06d}",
                                                                 block) for index, block in enumerate(blocks)),
                      self._compression)
        yield {"split": split, "shard": group, "path": final, "count": len(blocks), **statistics}


def build_language_pipeline(pipeline: beam.Pipeline, plan: SourcePlan, config: Config, data_dir: str,
                            summary_path: str, parts_dir: str | None = None, progress_dir: str | None = None):
    """Wires Read -> Decode/Split -> (vocabulary) -> Tokenize -> Pack/Write, dead letters and the
    summary onto `pipeline`. `parts_dir` is unused: a packing group is written whole by one worker."""
    data = config.data
    groups = pack_groups(plan, data)
    read = pipeline | "Read" >> ReadSource(plan) | "SpreadFiles" >> beam.Reshuffle()
    if progress_dir:
        read = read | "Progress" >> beam.ParDo(CountProgress(progress_dir))
    decoded = read | "DecodeSplit" >> beam.FlatMap(decode_and_split, plan, tuple(data.split), data.seed)
    documents = select(decoded, DOCUMENT, "Documents")
    all_dead = select(decoded, DEAD_LETTER, "DeadLetters")

    tagged = [read | "CountRead" >> beam.combiners.Count.Globally() | "TagRead" >> beam.Map(lambda n: ("read", n)),
              all_dead | "CountDeadLetters" >> beam.combiners.Count.Globally()
              | "TagDeadLetters" >> beam.Map(lambda n: ("dead_letters", n))]
    vocabulary_side = ()
    if data.tokenizer == "characters":
        vocabulary = (documents
                      | "TrainDocuments" >> beam.Filter(lambda document: document[0] == "train")
                      | "CountCharacters" >> beam.CombineGlobally(CharacterCountsFn())
                      | "TopCharacters" >> beam.Map(select_characters,
                                                    data.vocab_size - contract_lib.LANGUAGE_RESERVED_IDS,
                                                    data.min_count))
        vocabulary_side = (beam.pvalue.AsSingleton(vocabulary),)
        tagged.append(vocabulary | "TagVocabulary" >> beam.Map(lambda tokens: ("vocabulary", tokens)))
    elif data.tokenizer == "bpe":
        merges = (documents
                  | "TrainDocuments" >> beam.Filter(lambda document: document[0] == "train")
                  | "CountWords" >> beam.CombineGlobally(WordCountsFn())
                  | "LearnMerges" >> beam.Map(learn_merges, data.vocab_size - contract_lib.BYTE_VOCAB_SIZE,
                                              data.min_count))
        vocabulary_side = (beam.pvalue.AsSingleton(merges),)
        tagged.append(merges | "TagVocabulary" >> beam.Map(lambda lines: ("vocabulary", lines)))
    shards = (documents
              | "Tokenize" >> beam.Map(tokenize_document, data.tokenizer, groups, *vocabulary_side)
              | "GroupByShard" >> beam.GroupByKey()
              | "PackAndWrite" >> beam.ParDo(_PackShardFn(data_dir, groups, data.context_length, data.compression,
                                                          plan.input_feature)))
    tagged.append(shards | "TagShards" >> beam.Map(lambda shard: ("shard", shard)))
    _ = all_dead | "WriteDeadLetters" >> beam.io.WriteToText(
        storage.join(data_dir, DEAD_LETTER_DIR, "dead_letter"), file_name_suffix=".jsonl", skip_if_empty=True)
    _ = (tuple(tagged)
         | "MergeSummary" >> beam.Flatten()
         | "CollectSummary" >> beam.combiners.ToList()
         | "WriteSummary" >> beam.Map(write_summary, summary_path))


def language_contract(plan: SourcePlan, config: Config, summary: dict, data_dir: str):
    """The language contract (and vocab.txt's lines, escaped; None for bytes and bpe) from what
    the pipeline measured; writes an empty shard for a group no document hashed to, and for bpe
    the merges (merges.txt) and the token ids (vocab.json), GPT-2's two files."""
    data = config.data
    groups = pack_groups(plan, data)
    split_infos, per_split = {}, {name: {} for name in SPLIT_STATISTICS}
    for split in splits.SPLITS:
        shards = [shard for shard in summary["shards"] if shard["split"] == split]
        written = {shard["shard"] for shard in shards}
        for group in range(groups[split]):
            if group not in written:
                write_empty_shard(data_dir, shard_name(split, group, groups[split], data.compression))
        split_infos[split] = contract_lib.SplitInfo(count=sum(shard["count"] for shard in shards),
                                                    num_shards=groups[split],
                                                    file_pattern=shard_pattern(split, groups[split], data.compression))
        for name in SPLIT_STATISTICS:
            per_split[name][split] = sum(shard[name] for shard in shards)
    if not split_infos["train"].count:
        windows = sum(info.count for info in split_infos.values())
        if not windows:
            raise UserError(f"data.source: {plan.uri} gave the train split no text to learn from (read 0 windows in "
                            f"all, {summary['dead_letters']} dead letters): are its files empty?")
        raise UserError(f"data.source: {plan.uri} gave the train split no text to learn from: its {windows} windows "
                        f"are all in the other splits, which take whole documents (data.split "
                        f"{list(data.split)}); add documents, or set data.split=[1.0,0.0,0.0]")
    vocabulary = summary.get("vocabulary", []) if data.tokenizer in ("characters", "bpe") else None
    if data.tokenizer == "bpe":
        if not vocabulary:
            raise UserError(f"data.tokenizer: bpe learned no merges: no pair of bytes is seen data.min_count="
                            f"{data.min_count} times in the train split; add text, lower data.min_count, or use bytes")
        storage.write_text_atomic(storage.join(data_dir, MERGES_FILE),
                                  contract_lib.lines_text([bpe.MERGES_HEADER, *vocabulary]))
        storage.write_text_atomic(storage.join(data_dir, VOCABULARY_JSON_FILE),
                                  bpe.vocabulary_json(bpe.parse_merges(vocabulary), contract_lib.LANGUAGE_RESERVED_IDS))
    statistics = {
        "tokenizer": data.tokenizer,
        "vocab_size": contract_lib.language_vocab_size(data.tokenizer, vocabulary),
        "context_length": data.context_length,
        **per_split,
        # each file read is one document, a dead letter, or empty (skipped: it holds no text)
        "empty_files": summary["read"] - summary["dead_letters"] - sum(per_split["documents"].values()),
    }
    contract = contract_lib.DataContract(
        modality="language", input_feature=plan.input_feature, input_spec=plan.input_spec, class_names=(),
        splits=split_infos, statistics=statistics, compression=data.compression, source=plan.uri,
        bad_examples=summary["dead_letters"], augmentation={"copies": 0})
    lines = None if data.tokenizer != "characters" else [contract_lib.escape_token(token) for token in vocabulary]
    return contract, lines
