"""Text classification tables: the `csv:PATH` and `jsonl:PATH` sources, whose columns are named
by data.text_column, data.label_column and data.split_column, and the check of one text.

The driver reads only the beginning of the file (the CSV header, or the first JSONL lines)
to check the columns; a worker reads the whole file as a stream, row by row. CSV fields may
hold quoted newlines, commas and quotes (RFC 4180), which a line-based split would break,
so a file is one read task; keys are row numbers, as before. Bytes that are not UTF-8 make
that row a dead letter, not the file an error.

An unclosed quote would make Python's csv module read every line up to the next quote as one
field, swallowing the rows in it. A quoted field is taken for one when it breaks RFC 4180: the
file ends inside it, or its closing quote is followed by something other than a comma or a line
end. That row becomes one dead letter naming the file and the line where the quote opens, and
the lines after that line are read again as rows, so nothing else is lost. A runaway that a
later quote closes as RFC 4180 allows (`12",a`) is valid CSV, and read as such: no rule on the
lines inside it can tell it from a quoted paragraph without misreading some real paragraphs.

A split column takes the split names of folders and npz arrays (SPLIT_NAMES: `val` and `valid`
are validation), in any case and with surrounding blanks.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import re
from typing import Optional

from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLIT_NAMES
from kcp.core.sources.base import (BadInput, SourceError, SourcePlan, SourceRecord, check_path, field, field_paths,
                                   has_surrogates, label_text, open_binary)

HEAD_BYTES = 1 << 20  # what the driver reads: the CSV header or the first JSONL lines
FIELD_LIMIT = 2**31 - 1  # Python's csv module refuses fields over 131,072 characters by default
UTF8_HINT = "not UTF-8 text (save the file as UTF-8; Latin-1 or Windows-1252 bytes are not read)"
_FIELD_END = re.compile(r"[,\r\n]")


def _split_of(value, where: str) -> Optional[str]:
    if value is None or value == "":
        return None
    name = str(value).strip().lower()
    if name not in SPLIT_NAMES:
        raise SourceError(f"{where}: split {value!r} is not one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES[name]


def _text_stream(handle):
    return io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")


class _Lines:
    """The lines of a text stream as a csv reader takes them, keeping the raw lines of the row being
    read (`row`, which the caller empties before each row) and able to hand lines out again
    (`again`), for a fresh reader after a row that an unclosed quote ran away with."""

    def __init__(self, stream):
        self._stream, self._again = iter(stream), []
        self.row: list[str] = []
        self.number = 0  # lines handed out so far: the line number of the last one

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self._again.pop() if self._again else next(self._stream)
        self.number += 1
        self.row.append(line)
        return line

    def again(self, lines: list[str]) -> None:
        """Hands `lines` out again, next: the last len(lines) lines handed out."""
        self._again.extend(reversed(lines))
        self.number -= len(lines)


def _multiline_quoted_fields(raw: str):
    """(opening quote, closing quote or None at the end of the text, the character after it) of
    each quoted field that spans a line break or runs to the end of the raw text of one CSV row
    (an unclosed quote on the file's last line), found as Python's
    csv module (excel dialect, not strict) reads them: a quote opens a field only as its first
    character, `""` inside is a quote, and after the closing quote the field goes on, unquoted,
    to the next comma or line end."""
    position, size = 0, len(raw)
    while position < size:
        if raw[position] == '"':
            search = position + 1
            while True:
                close = raw.find('"', search)
                if close < 0 or raw[close + 1:close + 2] != '"':
                    break
                search = close + 2
            inside = raw[position:size if close < 0 else close]
            if close < 0 or "\n" in inside or "\r" in inside:
                yield position, (None if close < 0 else close), ("" if close < 0 else raw[close + 1:close + 2])
            if close < 0:
                return
            position = close + 1
        end = _FIELD_END.search(raw, position)
        if end is None or end.group() != ",":
            return
        position = end.end()


def _unclosed_quote(lines: list[str], first_line: int) -> Optional[tuple[int, str]]:
    """(index in `lines` of the line where an unclosed quote opens, what shows it) when the row that
    these raw lines make (its first on line `first_line` of the file) holds a quoted field that
    breaks RFC 4180 (the file ends inside it, or its closing quote is followed by something other
    than a comma or a line end), else None."""
    raw = "".join(lines)
    ends = list(itertools.accumulate(map(len, lines)))
    for start, close, after in _multiline_quoted_fields(raw):
        opened = bisect.bisect_right(ends, start)
        if close is None:
            return opened, "runs to the end of the file"
        closed = bisect.bisect_right(ends, close)
        if after not in (",", "\r", "\n", ""):
            return opened, (f"runs to line {first_line + closed}, where its closing quote is followed by {after!r}, "
                            "not a comma or a line end")
    return None


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
        header_lines = _Lines(io.StringIO(complete, newline=""))
        header = next(csv.reader(header_lines), None) if complete.strip() else None
        if not header:
            raise SourceError(f"data.source: {path} holds no rows")
        unclosed = _unclosed_quote(header_lines.row, 1) if len(header_lines.row) > 1 else None
        if unclosed:
            raise SourceError(f"data.source: {path} line {1 + unclosed[0]}: unclosed quote in the header: the quoted "
                              f"field that starts there {unclosed[1]}")
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
            columns |= set(field_paths(row))
    if not rows:
        raise SourceError(f"data.source: {path} holds no rows")
    first_line, first_row = parsed[0]
    # one array, on one line or spread over many ("[" then objects), not lines that are arrays each
    if not columns and first_line.startswith("[") and (rows == 1 or not isinstance(first_row, list)):
        raise SourceError(f"data.source: {path} is one JSON array, not JSON lines (one object a line); write one "
                          "object a line, e.g. jq -c '.[]' FILE.json > FILE.jsonl")
    return sorted(columns), int(size / max(1, len(text)) * rows)


DELIMITERS = {"\t": "tab", ";": "semicolon", "|": "pipe"}  # what a header of one column may hide


def _delimiter_hint(kind: str, columns) -> str:
    """For a CSV header read as one column that holds a tab, `;` or `|`: what it looks like, and the fix."""
    if kind != "csv" or len(columns) != 1:
        return ""
    for mark, name in DELIMITERS.items():
        if mark in columns[0]:
            return (f"; the header looks {name}-separated, and csv: reads comma-separated files only: save it with "
                    f"commas, e.g. pandas.read_csv(PATH, sep={mark!r}).to_csv(NEW_PATH, index=False)")
    return ""


def plan_table(uri: str, kind: str, path: str, data: DataConfig, labels: bool = True):
    """The plan of a CSV or JSON lines table; without `labels` (batch prediction) the label column
    may be missing and is not read, so no label makes a row a dead letter."""
    check_path(uri, path, "file")
    if labels and data.text_column == data.label_column:
        raise SourceError(f"data.text_column and data.label_column both name column {data.text_column!r}: "
                          "the label would be read from the text")
    columns, estimate = _head_columns(kind, path)
    needed = (("data.text_column", data.text_column),) + ((("data.label_column", data.label_column),) if labels else ())
    for option, column in needed:
        if column not in columns:
            where = path if kind == "csv" else f"the first lines of {path}"
            raise SourceError(f"{option}: column {column!r} is not in {where} "
                              f"(it has {', '.join(columns) or 'none'}){_delimiter_hint(kind, columns)}")
    options = {"path": path, "text": data.text_column, "label": data.label_column if labels else None,
               "split": data.split_column if kind == "jsonl" or data.split_column in columns else None,
               "limit": data.limit}
    spec = FeatureSpec("string", (), "utf8")
    count = min(estimate, data.limit) if data.limit else estimate
    return SourcePlan(uri, kind, "text", "text", spec, (), None, ((kind, path),), max(1, count), options)


def _record(number: int, row, options: dict, where: str, cells: bool = False) -> SourceRecord:
    """One row's record; `cells`: its values are CSV text, whose label is read as a table cell
    (label_text: missing-value markers, numbers written as floats)."""
    key = f"row/{number:08d}"
    if not isinstance(row, dict):
        return SourceRecord(key, None, "", None, f"{where}: not a JSON object ({type(row).__name__})")
    try:
        split = _split_of(field(row, options["split"]), where) if options["split"] else None
    except SourceError as error:
        return SourceRecord(key, None, "", None, str(error))
    label, text = field(row, options["label"]) if options["label"] else None, field(row, options["text"])
    if any(isinstance(value, str) and has_surrogates(value) for value in (label, text)):
        return SourceRecord(key, None, "", split, f"{where}: {UTF8_HINT}")
    try:
        label = label_text(label, cell=cells) if options["label"] else ""
    except BadInput as error:
        return SourceRecord(key, None, "", split, f"{where}: column {options['label']!r}: {error}")
    return SourceRecord(key, text, label, split, where=where)


def _read_csv(path: str, stream, options: dict):
    """The records of a CSV file: row numbers count the data rows from 1 (blank lines are no rows).
    A row that an unclosed quote ran away with is one dead letter, and the lines after the one
    where the quote opens are read again as rows. A row with more non-empty fields than the
    header has columns is one dead letter (pandas refuses the file; empty trailing fields, a comma
    at the end of each line, are ignored); one with fewer has its missing cells empty."""
    lines = _Lines(stream)
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header:
        return
    limit, number = options["limit"], 0
    named = len(header)  # the columns with a name: a comma ending every line, header too, names none
    while named and not header[named - 1].strip():
        named -= 1
    while True:
        lines.row = []
        first_line = lines.number + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            fields = error
        if fields == []:
            continue
        number += 1
        if limit and number > limit:
            return
        # a row of one line holds an unclosed quote only at the end of the file
        unclosed = _unclosed_quote(lines.row, first_line) if len(lines.row) > 1 or '"' in lines.row[0] else None
        if unclosed:
            opened, why = unclosed
            again = lines.row[opened + 1:]
            told = "" if not again else "; the line after it is read as a row" if len(again) == 1 else \
                f"; the {len(again)} lines after it are read as rows"
            yield SourceRecord(f"row/{number:08d}", None, "", None,
                               f"row {number}: unclosed quote: {path} line {first_line + opened}: the quoted field "
                               f"that starts there {why}{told}")
            lines.again(again)
            reader = csv.reader(lines)
            continue
        if isinstance(fields, csv.Error):
            raise SourceError(f"{path} row {number}: not valid CSV ({fields})")
        if any(cell.strip() for cell in fields[named:]):  # an unquoted comma in a field shifts its cells
            yield SourceRecord(f"row/{number:08d}", None, "", None,
                               f"row {number}: {len(fields)} fields, the header names {named} ({path} line "
                               f"{first_line}; quote a field that holds a comma)")
            continue
        row = dict(zip(header, fields))
        for name in header[len(fields):]:
            row[name] = None
        yield _record(number, row, options, f"row {number} (line {first_line})", cells=True)


def read_table_task(plan: SourcePlan, task):
    """The records of one table file, streamed: row numbers count the data rows from 1."""
    kind, path = task
    options, limit = plan.options, plan.options["limit"]
    with open_binary(path) as handle:
        stream = _text_stream(handle)
        if kind == "csv":
            csv.field_size_limit(FIELD_LIMIT)
            yield from _read_csv(path, stream, options)
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
    """A row's text: a string, or a JSON number as JSON writes it (a JSONL `"text": 40213`, a
    product code or an amount, reads as its CSV cell would, `40213`); not blank."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = json.dumps(text)
    if not isinstance(text, str):
        raise BadInput("no text" if text is None else f"text is {type(text).__name__}, not a string")
    if not text.strip():
        raise BadInput("empty text")
    return text
