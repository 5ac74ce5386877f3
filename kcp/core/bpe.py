"""Byte-level BPE for language data (`data.tokenizer: bpe`), in pure Python: learning the merges
from word counts (the pipeline) and encoding text (the pipeline, validation, the report).

The exported graph tokenizes with keras_hub's `BytePairTokenizer` (kcp/core/examples.py), which
is GPT-2's byte-level BPE written with TensorFlow ops. This module is its Python twin, so the
pipeline (which must not import TensorFlow) writes the very ids the served model will see:

    text -> words      `pretokenize`: GPT-2's split (contractions, letter runs, digit runs,
                       other runs, each with an optional leading space; whitespace runs keep
                       their last space for the next word), exactly as keras_hub runs it in the
                       graph: its RE2 rewrite of the pattern (RE2 has no look-ahead), with RE2's
                       ASCII \\s. One quirk comes with it: keras_hub uses U+096C (DEVANAGARI
                       DIGIT SIX, "६") as an in-band marker and drops every one from the input.
                       A NUL character is a word of its own (see `pretokenize`).
    word -> symbols    its UTF-8 bytes, each as GPT-2's printable stand-in character (`BYTE_SYMBOLS`)
    symbols -> tokens  the merges applied lowest rank first (GPT-2's `bpe`)

Ids: LANGUAGE_RESERVED_IDS + byte for the 256 single bytes (the ids of the `bytes` tokenizer),
then one id per merge in rank order: nothing is out of vocabulary. The run stores the merges
in RUN/data/merges.txt and the token -> id map in RUN/data/vocab.json (GPT-2's two files).
"""

from __future__ import annotations

import functools
import heapq
import json

import regex

MERGES_HEADER = "#version: 0.2"  # the first line of GPT-2's and Hugging Face's merges.txt

# keras_hub/src/tokenizers/byte_pair_tokenizer.py (keras-hub 0.32), in Python `regex` syntax:
# RE2's \s is [\t\n\f\r ] (ASCII), so it is spelled out; RE2's `$` is the end of the text (\Z).
_RE2_SPACE = "\t\n\f\r "
_SPECIAL_SPACES = "\u00a0\u2009\u202f\u3000"
_MARK = "\u096c"  # "६", keras_hub's marker
_MARK_SPACES = regex.compile(f"( )([^{_RE2_SPACE}{_SPECIAL_SPACES}])")
_MARK_END = regex.compile(f"([{_RE2_SPACE}]{_SPECIAL_SPACES})\\Z")  # a sequence, as keras_hub writes it
_SPLIT_WORDS = regex.compile(
    "'s|'t|'re|'ve|'m|'ll|'d"
    f"|[{_RE2_SPACE}{_SPECIAL_SPACES}]+[\n\r\t\f{_MARK}{_SPECIAL_SPACES}]| ?\\p{{L}}+| ?[\\p{{N}}]+"
    f"| ?[^{_RE2_SPACE}\\p{{L}}\\p{{N}}{_SPECIAL_SPACES}]+")
_SPLIT_LAST = regex.compile(f"[ \t\r\f\v{_MARK}{_SPECIAL_SPACES}]\\Z")


def _bytes_to_symbols() -> list[str]:
    """GPT-2's `bytes_to_unicode`: byte b -> a printable character (itself where it is one)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


BYTE_SYMBOLS = _bytes_to_symbols()  # indexed by byte
SYMBOL_BYTES = {symbol: bytes([byte]) for byte, symbol in enumerate(BYTE_SYMBOLS)}


def _regex_split(text: str, pattern) -> list[str]:
    """tensorflow_text.regex_split(text, pattern, pattern): the matches and the text between them."""
    pieces, end = [], 0
    for match in pattern.finditer(text):
        if match.start() > end:
            pieces.append(text[end:match.start()])
        pieces.append(match.group())
        end = match.end()
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def pretokenize(text: str) -> list[str]:
    """The words of `text` that BPE encodes one by one, as keras_hub's graph splits them; a NUL
    character is a word of its own, and the text on either side is split apart (TensorFlow
    Text's regex_split ends a string at its first NUL, so the graph splits at NULs first)."""
    words = []
    for index, piece in enumerate(text.split("\x00")):
        if index:
            words.append("\x00")
        words.extend(_pretokenize_piece(piece))
    return words


def _pretokenize_piece(text: str) -> list[str]:
    text = _MARK_END.sub(lambda match: match.group(1) + _MARK, _MARK_SPACES.sub(_MARK + r"\1\2", text))
    words = [piece for word in _regex_split(text, _SPLIT_WORDS) for piece in _regex_split(word, _SPLIT_LAST)]
    return [word for word in words if word != _MARK]


def word_symbols(word: str) -> tuple:
    """A word's UTF-8 bytes as BYTE_SYMBOLS characters."""
    return tuple(BYTE_SYMBOLS[byte] for byte in word.encode("utf-8"))


def token_bytes(token: str) -> bytes:
    """The bytes a token (a string of BYTE_SYMBOLS characters) stands for."""
    return b"".join(SYMBOL_BYTES[symbol] for symbol in token)


# --- learning ---------------------------------------------------------------------------

def learn_merges(word_counts: dict, num_merges: int, min_count: int = 2) -> list[tuple[str, str]]:
    """At most `num_merges` merges (left, right), in rank order, learned from {word: count}.

    Each step merges the adjacent pair of symbols seen most often (counted once per occurrence,
    weighted by the word's count); ties go to the smallest pair (by its two strings), so the
    result depends on the counts only, never on their order or the hash seed. Stops early when
    the best pair is seen fewer than `min_count` times. A pair whose merged token exists already
    is never chosen, so every merge adds one token.
    """
    words = [list(word_symbols(word)) for word in sorted(word_counts)]
    counts = [word_counts[word] for word in sorted(word_counts)]
    pair_counts: dict = {}
    where: dict = {}  # pair -> indices of the words that hold it
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + counts[index]
            where.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    tokens = set(BYTE_SYMBOLS)
    merges = []
    while heap and len(merges) < num_merges:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:
            continue  # a stale entry: the pair's count changed since it was pushed
        if -negative < min_count:
            break
        merged = pair[0] + pair[1]
        if merged in tokens:
            continue  # never chosen (pushed again if its count changes, and skipped again)
        merges.append(pair)
        tokens.add(merged)
        changed = set()
        for index in sorted(where.pop(pair)):
            symbols, count = words[index], counts[index]
            for old in zip(symbols, symbols[1:]):
                pair_counts[old] -= count
                where.get(old, set()).discard(index)
                changed.add(old)
            symbols = words[index] = _merge_pair(symbols, pair, merged)
            for new in zip(symbols, symbols[1:]):
                pair_counts[new] = pair_counts.get(new, 0) + count
                where.setdefault(new, set()).add(index)
                changed.add(new)
        pair_counts.pop(pair, None)
        for other in sorted(changed - {pair}):
            if pair_counts.get(other, 0) > 0:
                heapq.heappush(heap, (-pair_counts[other], other))
            else:
                pair_counts.pop(other, None)
    return merges


def _merge_pair(symbols: list, pair: tuple, merged: str) -> list:
    """`symbols` with every occurrence of `pair` (left to right, not overlapping) made one symbol."""
    out, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and symbols[index] == pair[0] and symbols[index + 1] == pair[1]:
            out.append(merged)
            index += 2
        else:
            out.append(symbols[index])
            index += 1
    return out


# --- the vocabulary and encoding ---------------------------------------------------------

def merge_lines(merges) -> list[str]:
    """Merges as merges.txt's lines ("LEFT RIGHT"; no symbol holds a space), without the header."""
    return [f"{left} {right}" for left, right in merges]


def parse_merges(lines) -> list[tuple[str, str]]:
    """merges.txt's lines (the header, if there, and empty lines skipped) -> (left, right) pairs."""
    pairs = []
    for line in lines:
        if not line or line.startswith("#version"):
            continue
        left, space, right = line.partition(" ")
        if not space or not left or not right or " " in right:
            raise ValueError(f"merges.txt: {line!r} is not a merge (two tokens and one space)")
        pairs.append((left, right))
    return pairs


def vocabulary(merges, first_id: int) -> dict:
    """{token: id}: the 256 byte symbols from `first_id` (in byte order), then each merge's token."""
    tokens = {symbol: first_id + byte for byte, symbol in enumerate(BYTE_SYMBOLS)}
    for rank, (left, right) in enumerate(merges):
        tokens[left + right] = first_id + 256 + rank
    return tokens


def vocabulary_json(merges, first_id: int) -> str:
    """vocab.json: `vocabulary` as GPT-2 and Hugging Face write it."""
    return json.dumps(vocabulary(merges, first_id), ensure_ascii=False, sort_keys=False) + "\n"


@functools.lru_cache(maxsize=4)
def token_pieces(lines: tuple) -> tuple:
    """The bytes of each token in id order (the 256 bytes, then each merge's token) of the merges
    `lines` (merges.txt's)."""
    return tuple([bytes([byte]) for byte in range(256)] + [token_bytes(left + right)
                                                           for left, right in parse_merges(lines)])


class Encoder:
    """Text -> ids with fixed merges; words seen before come from a cache."""

    def __init__(self, merges, first_id: int):
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.ids = vocabulary(merges, first_id)
        self.cache: dict = {}

    def word_tokens(self, word: str) -> list[str]:
        """GPT-2's `bpe`: merge the lowest-ranked adjacent pair, all its occurrences, until none is a merge."""
        symbols = list(word_symbols(word))
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda candidate: self.ranks.get(candidate, len(self.ranks)))
            if pair not in self.ranks:
                break
            symbols = _merge_pair(symbols, pair, pair[0] + pair[1])
        return symbols

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in pretokenize(text):
            cached = self.cache.get(word)
            if cached is None:
                cached = self.cache[word] = [self.ids[token] for token in self.word_tokens(word)]
                if len(self.cache) > 500_000:
                    self.cache.clear()
            ids.extend(cached)
        return ids


@functools.lru_cache(maxsize=4)
def encoder(lines: tuple, first_id: int) -> Encoder:
    """The Encoder of the merges `lines` (merges.txt's), cached: a worker builds it once per run."""
    return Encoder(parse_merges(lines), first_id)
