"""Sources of raw examples, chosen by `data.source` (`kcp preprocess --source URI`).

    digits              scikit-learn's bundled 8x8 digits (the embedded default)
    folder:PATH         PATH/<class>/**/*.{png,jpg,jpeg,bmp,gif,webp,tif,tiff}, or PATH/{train,validation,test}/<class>/...
    npz:PATH            x, y  or  x_train, y_train, x_test, y_test[, x_validation, y_validation] (or x_val, y_val)
    csv:PATH, jsonl:PATH  text classification: data.text_column, data.label_column, data.split_column
    tfds:NAME[:SPLIT]   a prepared TensorFlow Datasets builder under data.tfds_data_dir
    text:PATH           language modelling: every file below PATH (or the file PATH) is one document
    python-stdlib       language modelling: the Python standard library's top-level modules (embedded)

One module per kind: images.py (digits, folder), arrays.py (npz), tables.py (csv, jsonl),
tfds.py, corpus.py (text, python-stdlib); the shared record types and errors are in base.py.

`plan_source` runs in the driver and only plans: it checks the source (a missing path, an
empty source or a missing column fails here, with one line naming it) and fixes the
modality and the input spec from names, headers and a bounded sample, never from a pass
over every input. It returns a `SourcePlan` whose `tasks` are small read tasks. On the
workers, `read_task` turns one task into `SourceRecord`s (a file path, a row, an array) and
`decode_record` one record into a `RawExample`, raising `BadInput` for what goes to the dead
letters. `kcp.core.beamio.ReadSource` wires the two into a Beam read. Preprocessing and
batch prediction both read their inputs through here.
"""

from __future__ import annotations

from kcp.core.config import LANGUAGE_SOURCE_KINDS, DataConfig
from kcp.core.sources.arrays import decode_array, plan_npz, read_npz_task
from kcp.core.sources.base import (BadInput, RawExample, SourceError, SourcePlan, SourceRecord, check_path,
                                   class_names_of)
from kcp.core.sources.corpus import STDLIB_URI, decode_document, plan_stdlib, plan_text, read_corpus_task
from kcp.core.sources.folder_notes import folder_warning_lines, skipped_line, unserved_line
from kcp.core.sources.images import (check_image_bytes, decode_image_file, digits_to_uint8, plan_digits, plan_folder,
                                     read_digits, read_folder_task)
from kcp.core.sources.tables import decode_text, plan_table, read_table_task
from kcp.core.sources.tfds import plan_tfds, read_tfds_task

__all__ = [
    "BadInput", "RawExample", "SourceError", "SourcePlan", "SourceRecord", "check_image_bytes", "check_path",
    "class_names_of", "decode_array", "decode_document", "decode_image_file", "decode_record", "decode_text", "digits_to_uint8",
    "plan_source", "read_task", "record_text", "skipped_line", "folder_warning_lines", "unserved_line",
]


# what a source kind always holds (npz and tfds hold images or sequences: known once planned)
# (the language kinds are config's, which also decides a language source's defaults)
KIND_MODALITY = {"digits": "image", "folder": "image", "csv": "text", "jsonl": "text",
                 **{kind: "language" for kind in LANGUAGE_SOURCE_KINDS}}


def source_modality(uri: str) -> str | None:
    """The modality a source URI holds when its kind alone says (before reading it), else None."""
    return KIND_MODALITY.get(uri) or KIND_MODALITY.get(uri.partition(":")[0])


def source_path(uri: str) -> str:
    """The file or folder a source URI reads (`csv:gs://b/t.csv` -> `gs://b/t.csv`); "" for the sources
    that name no path (digits, tfds:, python-stdlib)."""
    kind, _, path = uri.partition(":")
    return path if kind in ("folder", "npz", "csv", "jsonl", "text") else ""


def plan_source(uri: str, data: DataConfig | None = None, labels: bool = True) -> SourcePlan:
    """Checks a source URI and plans its reading; one-line SourceError when it cannot be read.
    `labels=False` (batch prediction): no label is read, so none is needed: a table needs no label
    column, an npz no y arrays (`x` alone will do), and a folder no class folders (every image below
    PATH is read, subfolders included, keyed by its path relative to PATH)."""
    data = data or DataConfig()
    kind, _, rest = uri.partition(":")
    held = source_modality(uri)
    if data.modality and kind != "npz" and held and data.modality != held:  # it used to be ignored without a word
        series = "; series go in an npz (x [N, T, F])" if data.modality == "sequence" else ""
        raise SourceError(f"data.modality: {data.modality!r} applies to npz sources; {uri} holds {held}{series} "
                          "(set data.modality=null)")
    if kind == "digits":
        return plan_digits(uri, data)
    if kind == "folder":
        return plan_folder(uri, rest, data, labels)
    if kind == "npz":
        return plan_npz(uri, rest, data, labels)
    if kind in ("csv", "jsonl"):
        return plan_table(uri, kind, rest, data, labels)
    if kind == "tfds":
        return plan_tfds(uri, rest, data)
    if kind == "text":
        return plan_text(uri, rest, data)
    if uri == STDLIB_URI:
        return plan_stdlib(uri, data)
    raise SourceError(f"data.source: {uri!r} is not a known source; allowed: digits, folder:PATH, npz:PATH, "
                      "csv:PATH, jsonl:PATH, tfds:NAME[:SPLIT], text:PATH, python-stdlib")


def read_task(plan: SourcePlan, task):
    """The records of one read task (runs on the workers)."""
    if plan.kind == "digits":
        return read_digits(task[1], task[2])
    if plan.kind == "folder":
        return read_folder_task(plan, task)
    if plan.kind == "npz":
        return read_npz_task(plan, task)
    if plan.kind in ("csv", "jsonl"):
        return read_table_task(plan, task)
    if plan.modality == "language":
        return read_corpus_task(plan, task)
    return read_tfds_task(plan, task)


def _at(plan: SourcePlan, record: SourceRecord, column: str) -> str:
    """"row 3 (line 4): column 'label': ", where a table's dead letter is; "" for other sources."""
    return f"{record.where}: column {plan.options[column]!r}: " if record.where else ""


def record_text(plan: SourcePlan, record: SourceRecord) -> str:
    """A text record's string; a BadInput naming the row, line and column for a table's (preprocessing
    and batch prediction alike)."""
    try:
        return decode_text(record.payload)
    except BadInput as error:
        raise BadInput(_at(plan, record, "text") + str(error)) from None


def decode_record(plan: SourcePlan, record: SourceRecord, class_names=None) -> RawExample:
    """Turns a record into a RawExample; raises BadInput for a dead letter. `class_names` (any
    collection: a tuple, or the label index) is the plan's when not given."""
    class_names = plan.class_names if class_names is None else class_names
    if record.problem:
        raise BadInput(record.problem)
    if plan.modality == "language":  # a document: no label; its text, read here on the worker
        return RawExample(record.key, decode_document(record.payload), "", record.split)
    if record.label == "" or record.label not in class_names:
        raise BadInput(_at(plan, record, "label") + ("missing label" if record.label == ""
                                                     else f"unknown label {record.label!r}"))
    if plan.modality == "text":
        inputs = record_text(plan, record)
    elif plan.kind == "folder":
        inputs = decode_image_file(record.payload, plan.input_spec.shape)
    else:
        inputs = decode_array(record.payload, plan.input_spec)
    return RawExample(record.key, inputs, record.label, record.split)
