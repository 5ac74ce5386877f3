"""Character n-grams (`data.char_ngrams`): beside its tokens, a text is also a bag of its character
1..N-grams, hashed into `data.char_ngram_buckets` ids (fastText's subword features; Joulin et al. 2016,
Bojanowski et al. 2017). This is the Python half, and what the contract records: the pipeline measures
`char_ngram_text` lengths, the in-graph ids are kcp/core/examples.py's `char_ngram_ids`, tested gram for
gram against `char_ngrams`. Never imports TensorFlow.

The n-grams are taken from `char_ngram_text(text)`, cut to `max_characters` characters, with one space on
each side (so the start and the end of a line are n-grams of their own). Id 0 is padding; a gram's id is
1 + its FarmHash fingerprint modulo (buckets - 1), `tf.strings.to_hash_bucket_fast`, so no vocabulary is
needed.
"""

from __future__ import annotations

from kcp.core.contract import DataContract, tokenize_text

DEFAULT_CHAR_NGRAMS = 4
DEFAULT_CHAR_NGRAM_BUCKETS = 2**16


def char_ngram_text(text: str) -> str:
    """The characters a text's n-grams are taken from: the `characters` tokenizer's, joined (ASCII letters
    lower-cased, each run of ASCII whitespace one space, none at either end); its length is what
    `max_characters` counts."""
    return "".join(tokenize_text(text, "characters"))


def char_ngrams(text: str, n: int, max_characters: int) -> list[str]:
    """The character 1..n-grams the in-graph features hash, in that order: all unigrams, then all
    bigrams, ..., of `char_ngram_text(text)[:max_characters]` with a space on each side."""
    padded = f" {char_ngram_text(text)[:max_characters]} "
    return [padded[start:start + width] for width in range(1, n + 1) for start in range(len(padded) - width + 1)]


def char_ngram_count(n: int, max_characters: int) -> int:
    """How many n-gram ids a text's features hold: those of a text of `max_characters` (shorter ones are padded)."""
    padded = max_characters + 2
    return sum(max(0, padded - width + 1) for width in range(1, n + 1))


def char_ngram_settings(contract: DataContract) -> tuple[int, int, int]:
    """(n, buckets, max_characters) of the contract's character n-grams; n 0: none (contracts before them)."""
    statistics = contract.statistics
    n = int(statistics.get("char_ngrams", 0)) if contract.modality == "text" else 0
    if not n:
        return 0, 0, 0
    return n, int(statistics["char_ngram_buckets"]), int(statistics["max_characters"])
