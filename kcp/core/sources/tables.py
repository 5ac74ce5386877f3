"""Text classification tables: the `csv:PATH` and `jsonl:PATH` sources, whose columns are named
by data.text_column, data.label_column and data.split_column, and the check of one text.

The driver reads only the beginning of the file (the CSV header, or the first JSONL lines)
to check the columns; a worker reads the whole file as a stream, row by row. CSV fields may
hold quoted newlines, commas and quotes (RFC 4180), which a line-based split would break,
so a file is one read task; keys are row numbers, as before. Bytes that are not UTF-8 make
that row a dead letter, not the file an error.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Optional

from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLITS
from kcp.core.sources.base import (BadInput, SourceError, SourcePlan, SourceRecord, check_path, has_surrogates,
                                   label_text, open_binary)

HEAD_BYTES = 1 << 20  # what the driver reads: the CSV header or the first JSONL lines
FIELD_LIMIT = 2**31 - 1  # Python's csv module refuses fields over 131,072 characters by default
UTF8_HINT = "not UTF-8 text (save the file as UTF-8; Latin-1 or Windows-1252 bytes are not read)"


def _split_of(value, where: str) -> Optional[str]:
    if value is None or value == "":
        return None
    split = str(value).strip().lower()
    if split not in SPLITS:
        raise SourceError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return split


def _text_stream(handle):
    return io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _head_columns(kind: str, path: str) -> tuple[list[str], int]:
    """(column names, estimated rows) from the first HEAD_BYTES of the file."""
    with open_binary(path) as handle:
        head = handle.read(HEAD_BYTES)
    try:
        from apache_beam.io.filesystems import FileSystems

        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    except Exception:  # noqa: BLE001  the size is only for the estimate
        size = len(head)
    text = head.decode("utf-8-sig", errors="surrogateescape")
    # lines end at \n, \r or \r\n, as the workers' stream reads them (never at U+2028 or U+0085,
    # which JSON strings may hold raw); the last line of a cut head is incomplete
    lines = list(io.StringIO(text, newline=""))
    if size > len(head):
        lines = lines[:-1]
    if kind == "csv":
        complete = "".join(lines)
        header = next(csv.reader(io.StringIO(complete, newline="")), None) if complete.strip() else None
        if not header:
            raise SourceError(f"data.source: {path} holds no rows")
        if any(has_surrogates(name) for name in header):
            raise SourceError(f"data.source: {path}: the header is {UTF8_HINT}")
        named = [name for name in header if name]
        twice = next((name for name in named if named.count(name) > 1), None)
        if twice is not None:
            places = [str(index) for index, name in enumerate(header, start=1) if name == twice]
            raise SourceError(f"data.source: {path}: column {twice!r} appears {len(places)} times in the header "
                              f"(columns {', '.join(places)}); rename all but one")
        return header, int(size / max(1, len(complete)) * max(1, len(lines)))
    columns, rows, parsed = set(), 0, []
    for line in lines:
        if not line.strip():
            continue
        rows += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        parsed.append((line.lstrip(), row))
        if isinstance(row, dict):
            columns |= set(row)
    if not rows:
        raise SourceError(f"data.source: {path} holds no rows")
    first_line, first_row = parsed[0]
    # one array, on one line or spread over many ("[" then objects), not lines that are arrays each
    if not columns and first_line.startswith("[") and (rows == 1 or not isinstance(first_row, list)):
        raise SourceError(f"data.source: {path} is one JSON array, not JSON lines (one object a line); write one "
                          "object a line, e.g. jq -c '.[]' FILE.json > FILE.jsonl")
    return sorted(columns), int(size / max(1, len(text)) * rows)


def plan_table(uri: str, kind: str, path: str, data: DataConfig, labels: bool = True):
    """The plan of a CSV or JSON lines table; without `labels` (batch prediction) the label column
    may be missing and is not read, so no label makes a row a dead letter."""
    check_path(uri, path)
    columns, estimate = _head_columns(kind, path)
    needed = (("data.text_column", data.text_column),) + ((("data.label_column", data.label_column),) if labels else ())
    for option, column in needed:
        if column not in columns:
            where = path if kind == "csv" else f"the first lines of {path}"
            raise SourceError(f"{option}: column {column!r} is not in {where} "
                              f"(it has {', '.join(columns) or 'none'})")
    options = {"path": path, "text": data.text_column, "label": data.label_column if labels else None,
               "split": data.split_column if kind == "jsonl" or data.split_column in columns else None,
               "limit": data.limit}
    spec = FeatureSpec("string", (), "utf8")
    count = min(estimate, data.limit) if data.limit else estimate
    return SourcePlan(uri, kind, "text", "text", spec, (), None, ((kind, path),), max(1, count), options)


def _record(number: int, row, options: dict, where: str) -> SourceRecord:
    key = f"row/{number:08d}"
    if not isinstance(row, dict):
        return SourceRecord(key, None, "", None, f"{where}: not a JSON object ({type(row).__name__})")
    try:
        split = _split_of(row.get(options["split"]), where) if options["split"] else None
    except SourceError as error:
        return SourceRecord(key, None, "", None, str(error))
    label, text = row.get(options["label"]) if options["label"] else None, row.get(options["text"])
    if any(isinstance(value, str) and has_surrogates(value) for value in (label, text)):
        return SourceRecord(key, None, "", split, f"{where}: {UTF8_HINT}")
    try:
        label = label_text(label) if options["label"] else ""
    except BadInput as error:
        return SourceRecord(key, None, "", split, f"{where}: column {options['label']!r}: {error}")
    return SourceRecord(key, text, label, split)


def read_table_task(plan: SourcePlan, task):
    """The records of one table file, streamed: row numbers count the data rows from 1."""
    kind, path = task
    options, limit = plan.options, plan.options["limit"]
    with open_binary(path) as handle:
        stream = _text_stream(handle)
        if kind == "csv":
            csv.field_size_limit(FIELD_LIMIT)
            reader = csv.DictReader(stream)
            number = 0
            try:
                for number, row in enumerate(reader, start=1):
                    if limit and number > limit:
                        return
                    yield _record(number, row, options, f"row {number}")
            except csv.Error as error:
                raise SourceError(f"{path} row {number + 1}: not valid CSV ({error})") from None
            return
        number = 0
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            number += 1
            if limit and number > limit:
                return
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield SourceRecord(f"row/{number:08d}", None, "", None, f"line {line_number}: not JSON ({error.msg})")
                continue
            yield _record(number, row, options, f"line {line_number}")


def decode_text(text) -> str:
    if not isinstance(text, str):
        raise BadInput("no text" if text is None else f"text is {type(text).__name__}, not a string")
    if not text.strip():
        raise BadInput("empty text")
    return text
