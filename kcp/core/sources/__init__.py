"""Sources of raw examples, chosen by `data.source` (`kcp preprocess --source URI`).

    digits              scikit-learn's bundled 8x8 digits (the embedded default)
    folder:PATH         PATH/<class>/*.{png,jpg,jpeg,bmp,gif}, or PATH/{train,validation,test}/<class>/...
    npz:PATH            x, y  or  x_train, y_train, x_test, y_test[, x_validation, y_validation]
    csv:PATH, jsonl:PATH  text classification: data.text_column, data.label_column, data.split_column
    tfds:NAME[:SPLIT]   a prepared TensorFlow Datasets builder under data.tfds_data_dir

One module per kind: images.py (digits, folder), arrays.py (npz), tables.py (csv, jsonl),
tfds.py; the shared record types and errors are in base.py.

`plan_source` runs in the driver before the pipeline: it checks the source (a missing path,
an empty source or a missing column fails here, with one line naming it), fixes the
modality, the input spec and the class names, and lists the records. Records are small
(file paths, or rows and arrays of in-memory sources); `decode_record` turns one into a
`RawExample` inside the pipeline, raising `BadInput` for what goes to the dead letters.
Preprocessing and batch prediction both read their inputs through here.
"""

from __future__ import annotations

from kcp.core.config import DataConfig
from kcp.core.sources.arrays import decode_array, plan_npz
from kcp.core.sources.base import (BadInput, RawExample, SourceError, SourcePlan, SourceRecord, check_path,
                                   class_names_of)
from kcp.core.sources.images import decode_image_file, digits_to_uint8, plan_digits, plan_folder
from kcp.core.sources.tables import decode_text, plan_table
from kcp.core.sources.tfds import plan_tfds

__all__ = [
    "BadInput", "RawExample", "SourceError", "SourcePlan", "SourceRecord", "check_path", "class_names_of",
    "decode_array", "decode_image_file", "decode_record", "decode_text", "digits_to_uint8", "plan_source",
]


def plan_source(uri: str, data: DataConfig | None = None) -> tuple[SourcePlan, list[SourceRecord]]:
    """Checks a source URI and lists its records; one-line SourceError when it cannot be read."""
    data = data or DataConfig()
    kind, _, rest = uri.partition(":")
    if kind == "digits":
        plan, records = plan_digits(uri)
    elif kind == "folder":
        plan, records = plan_folder(uri, rest, data)
    elif kind == "npz":
        plan, records = plan_npz(uri, rest, data)
    elif kind in ("csv", "jsonl"):
        plan, records = plan_table(uri, kind, rest, data)
    elif kind == "tfds":
        plan, records = plan_tfds(uri, rest, data)
    else:
        raise SourceError(f"data.source: {uri!r} is not a known source; allowed: digits, folder:PATH, npz:PATH, "
                          "csv:PATH, jsonl:PATH, tfds:NAME[:SPLIT]")
    if data.limit:
        records = records[:data.limit]
    return plan, records


def decode_record(plan: SourcePlan, record: SourceRecord) -> RawExample:
    """Turns a listed record into a RawExample; raises BadInput for a dead letter."""
    if record.label == "" or record.label not in plan.class_names:
        raise BadInput("missing label" if record.label == "" else f"unknown label {record.label!r}")
    if plan.modality == "text":
        inputs = decode_text(record.payload)
    elif plan.kind == "folder":
        inputs = decode_image_file(record.payload, plan.input_spec.shape)
    else:
        inputs = decode_array(record.payload, plan.input_spec)
    return RawExample(record.key, inputs, record.label, record.split)
