"""Text classification tables: the `csv:PATH` and `jsonl:PATH` sources, whose columns are named
by data.text_column, data.label_column and data.split_column, and the check of one text."""

from __future__ import annotations

import csv
import io
import json
from typing import Optional

from kcp.core import storage
from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLITS
from kcp.core.sources.base import BadInput, SourceError, SourcePlan, SourceRecord, check_path, class_names_of


def _split_of(value, where: str) -> Optional[str]:
    if value is None or value == "":
        return None
    split = str(value).strip().lower()
    if split not in SPLITS:
        raise SourceError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return split


def _read_rows(kind: str, content: str) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a csv or jsonl file; a jsonl line that is not JSON becomes a
    row holding only `__bad__` (its reason), decoded later as a dead letter."""
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(content))
        columns = reader.fieldnames or []
        return list(reader), columns
    rows = []
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                rows.append({"__bad__": f"line {number}: not JSON ({error.msg})"})
    return rows, sorted({key for row in rows for key in row if key != "__bad__"})


def plan_table(uri: str, kind: str, path: str, data: DataConfig):
    check_path(uri, path)
    rows, columns = _read_rows(kind, storage.read_bytes(path).decode("utf-8-sig"))
    if not rows:
        raise SourceError(f"data.source: {path} holds no rows")
    for option, column in (("data.text_column", data.text_column), ("data.label_column", data.label_column)):
        if column not in columns:
            raise SourceError(f"{option}: column {column!r} is not in {path} (it has {', '.join(columns) or 'none'})")
    use_split = data.split_column in columns
    records = []
    for number, row in enumerate(rows, start=1):
        key = f"row/{number:08d}"
        if "__bad__" in row:
            records.append(SourceRecord(key, None, "", None))  # decoded as a dead letter
            continue
        split = _split_of(row.get(data.split_column), f"{path} row {number}") if use_split else None
        label = row.get(data.label_column)
        records.append(SourceRecord(key, row.get(data.text_column), "" if label is None else str(label), split))
    labels = [r.label for r in records if r.label]
    if not labels:
        raise SourceError(f"data.label_column: column {data.label_column!r} of {path} is empty")
    has_splits = use_split and any(r.split for r in records)
    spec = FeatureSpec("string", (), "utf8")
    return SourcePlan(uri, kind, "text", "text", spec, class_names_of(labels), has_splits), records


def decode_text(text) -> str:
    if not isinstance(text, str):
        raise BadInput("no text" if text is None else f"text is {type(text).__name__}, not a string")
    if not text.strip():
        raise BadInput("empty text")
    return text
