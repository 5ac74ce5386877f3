"""CSV and JSON lines tables: a split column takes the split names that folders and npz arrays
take (kcp.core.layout.SPLIT_NAMES), and an unclosed quote in a CSV is one dead letter naming the
file and the line where it opens, not the silent loss of the rows after it."""

import csv
import json

import pytest

from kcp.core.config_load import load_config
from kcp.core.layout import SPLIT_NAMES
from kcp.core.sources import SourceError, plan_source, read_task
from pipeline.preprocess import run_preprocess
from tests.conftest import IN_PROCESS_BEAM


def records_of(uri, *overrides, labels=True):
    plan = plan_source(uri, load_config([], list(overrides)).data, labels=labels)
    return plan, [record for task in plan.tasks for record in read_task(plan, task)]


def rows_of(records):
    return [(r.key, r.payload, r.label, r.problem) for r in records]


def dead_letters(run_dir):
    return sorted((json.loads(line) for path in (run_dir / "data" / "dead_letter").iterdir()
                   for line in path.read_text().splitlines()), key=lambda letter: letter["key"])


# --- split names ------------------------------------------------------------------------------

ALLOWED = "train, validation, val, valid, test"


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_split_column_takes_the_split_names_of_folders_and_npz(tmp_path, kind):
    names = list(SPLIT_NAMES) + ["VAL", " Valid ", "Test", "", "dev"]
    path = tmp_path / f"t.{kind}"
    if kind == "csv":
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([("text", "label", "split")] + [(f"t{i}", "ab"[i % 2], name)
                                                                         for i, name in enumerate(names)])
        where = f"row {len(names)} (line {len(names) + 1})"
    else:
        path.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2], "split": name}) + "\n"
                                for i, name in enumerate(names)))
        where = f"line {len(names)}"
    _, records = records_of(f"{kind}:{path}")
    assert [r.split for r in records[:len(SPLIT_NAMES)]] == list(SPLIT_NAMES.values())
    assert [(r.split, r.problem) for r in records[len(SPLIT_NAMES):]] == [
        ("validation", None), ("validation", None), ("test", None), (None, None),
        (None, f"{where}: split 'dev' is not one of {ALLOWED}")]


def test_val_and_valid_rows_are_the_validation_split_of_a_preprocessed_table(tmp_path):
    """40 rows: 24 train, 8 val/valid (so no validation is carved out of train), 8 test; a `dev`
    row is the one dead letter, naming the file, the row and the value."""
    given = ["train", "Train", "train", "train", "TRAIN", "train", "val", " valid ", "TEST", "test"]
    rows = [(f"review number {i} was {'good' if i % 2 else 'bad'}", "neg pos".split()[i % 2], given[i % 10])
            for i in range(40)]
    rows.insert(20, ("a dev row", "pos", "dev"))
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label", "split")] + rows)
    config = load_config([], [f"data.source=csv:{path}", "data.min_count=1", "data.max_bad_fraction=0.1"])
    contract = run_preprocess(config, str(tmp_path / "run"), IN_PROCESS_BEAM)
    assert {split: info.count for split, info in contract.splits.items()} == {"train": 24, "validation": 8, "test": 8}
    assert contract.bad_examples == 1 and contract.class_names == ("neg", "pos")
    assert dead_letters(tmp_path / "run") == [{"key": "row/00000021", "source": f"csv:{path}",
                                               "reason": f"row 21 (line 22): split 'dev' is not one of {ALLOWED}"}]


def test_a_row_with_more_fields_than_the_header_is_one_dead_letter(tmp_path):
    """An unquoted comma in the text would shift a cell into the label: a new class, silently."""
    path = tmp_path / "t.csv"
    path.write_text("text,label\nok,a,\ngreat movie, loved it,b\nshort\nfine,b, ,\n")  # empty trailing fields: fine
    _, records = records_of(f"csv:{path}")
    assert rows_of(records) == [
        ("row/00000001", "ok", "a", None),
        ("row/00000002", None, "", f"row 2: 3 fields, the header names 2 ({path} line 3; quote a field that holds a comma)"),
        ("row/00000003", "short", "", None), ("row/00000004", "fine", "b", None)]
    path.write_text("text,label,\nok,a,\ngreat movie, loved it,b,\n")  # a comma ending every line, header too
    _, records = records_of(f"csv:{path}")
    assert rows_of(records) == [
        ("row/00000001", "ok", "a", None),
        ("row/00000002", None, "", f"row 2: 4 fields, the header names 2 ({path} line 3; quote a field that holds a comma)")]


# --- unclosed quotes ---------------------------------------------------------------------------

HEAD = 'text,label\nok,a\nfine,b\n'


@pytest.mark.parametrize("rest, lines, why, after", [
    # the file ends inside the quote
    ('"broken, here,b\nthree,a\nfour,b\n', 2, "runs to the end of the file", ["three", "four"]),
    # a later quoted field's opening quote closes it, followed by its text
    ('"broken,b\nthree,a\nfour,b\n"quoted, x",a\nfive,b\n', 3,
     "runs to line 7, where its closing quote is followed by 'q', not a comma or a line end",
     ["three", "four", "quoted, x", "five"]),
    # an inch mark in a later unquoted field closes it, followed by a blank
    ('"broken,b\nthree,a\n12" screen,a\nfive,b\n', 2,
     "runs to line 6, where its closing quote is followed by ' ', not a comma or a line end",
     ["three", '12" screen', "five"]),
])
def test_an_unclosed_quote_is_one_dead_letter_and_the_rows_after_it_are_read(tmp_path, rest, lines, why, after):
    path = tmp_path / "t.csv"
    path.write_text(HEAD + rest)
    _, records = records_of(f"csv:{path}")
    told = "; the line after it is read as a row" if lines == 1 else f"; the {lines} lines after it are read as rows"
    assert rows_of(records[:3]) == [
        ("row/00000001", "ok", "a", None), ("row/00000002", "fine", "b", None),
        ("row/00000003", None, "", f"row 3: unclosed quote: {path} line 4: the quoted field that starts there {why}"
                                   f"{told}")]
    assert [(r.key, r.payload, r.problem) for r in records[3:]] == [
        (f"row/{number:08d}", text, None) for number, text in enumerate(after, start=4)]


def test_an_unclosed_quote_on_the_last_line_is_named(tmp_path):
    for ending in ("", "\n"):
        path = tmp_path / "t.csv"
        path.write_text(HEAD + '"broken, here,b' + ending)
        _, records = records_of(f"csv:{path}")
        assert rows_of(records)[2:] == [("row/00000003", None, "", f"row 3: unclosed quote: {path} line 4: the quoted "
                                         "field that starts there runs to the end of the file")]


def test_a_quote_that_closes_as_rfc_4180_allows_is_read_as_csv(tmp_path):
    """A runaway that an inch mark at the end of a field closes is valid CSV, and so is a quoted
    recipe whose lines look like rows: both read as one multi-line field, as Python's csv does."""
    path = tmp_path / "t.csv"
    path.write_text('label,text\n1,a\n2,b\n1,"Recipe\n1, flour\n2, eggs\nmix"\n')
    _, records = records_of(f"csv:{path}")
    assert rows_of(records) == [("row/00000001", "a", "1", None), ("row/00000002", "b", "2", None),
                                ("row/00000003", "Recipe\n1, flour\n2, eggs\nmix", "1", None)]
    path.write_text(HEAD + '"broken,b\nthree,a\nscreen 12",a\nfive,b\n')
    _, records = records_of(f"csv:{path}")
    assert rows_of(records)[2:] == [("row/00000003", 'broken,b\nthree,a\nscreen 12', "a", None),
                                    ("row/00000004", "five", "b", None)]


def test_multi_line_quoted_text_is_not_an_unclosed_quote(tmp_path):
    """Paragraphs with commas in a two-column table, a paragraph that ends like a row after a blank
    line, a line that ends in a comma after a row without a label, and CR line endings are read
    as they are; an unclosed quote in a CR-only file is named."""
    path = tmp_path / "t.csv"
    path.write_text(HEAD + '"para one, fine\npara two, also\npara three",a\n'
                           '"first, b\n\nsecond, b\nthird",b\nno label,\n"At first,\nit was fine,\nthen not",a\n'
                           'five,b\n')
    _, records = records_of(f"csv:{path}")
    assert rows_of(records) == [
        ("row/00000001", "ok", "a", None), ("row/00000002", "fine", "b", None),
        ("row/00000003", "para one, fine\npara two, also\npara three", "a", None),
        ("row/00000004", "first, b\n\nsecond, b\nthird", "b", None),
        ("row/00000005", "no label", "", None), ("row/00000006", "At first,\nit was fine,\nthen not", "a", None),
        ("row/00000007", "five", "b", None)]
    cr = tmp_path / "cr.csv"
    cr.write_bytes(b'text,label\rone two,a\r"quoted\rcell",b\r"broken,a\rthree,a\r')
    _, records = records_of(f"csv:{cr}")
    assert rows_of(records) == [
        ("row/00000001", "one two", "a", None), ("row/00000002", "quoted\rcell", "b", None),
        ("row/00000003", None, "", f"row 3: unclosed quote: {cr} line 5: the quoted field that starts there runs "
                                   "to the end of the file; the line after it is read as a row"),
        ("row/00000004", "three", "a", None)]


def test_without_labels_only_a_quote_that_breaks_rfc_4180_is_unclosed(tmp_path):
    """Batch prediction reads a text column alone: any line of text reads as a one-column row, so
    lines inside a quote tell nothing; a quote that runs to the end of the file still does."""
    path = tmp_path / "t.csv"
    path.write_text('text\n"one\ntwo\nthree"\n"four\nfive\n')
    _, records = records_of(f"csv:{path}", labels=False)
    assert rows_of(records) == [
        ("row/00000001", "one\ntwo\nthree", "", None),
        ("row/00000002", None, "", f"row 2: unclosed quote: {path} line 5: the quoted field that starts there runs "
                                   "to the end of the file; the line after it is read as a row"),
        ("row/00000003", "five", "", None)]


def test_an_unclosed_quote_in_the_header_is_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('"text,label\nok,a\nfine,b\n')
    with pytest.raises(SourceError) as raised:
        plan_source(f"csv:{path}")
    assert str(raised.value) == (f"data.source: {path} line 1: unclosed quote in the header: the quoted field that "
                                 "starts there runs to the end of the file")


def test_a_preprocessed_csv_with_an_unclosed_quote_loses_only_that_row(tmp_path):
    """41 rows, the 11th with an unclosed quote that the quoted field of row 22 closes: Python's csv
    module alone read rows 11 to 22 as one row labelled 'number 20"' (a class of its own, and 11
    rows gone); now that row is the one dead letter, naming the file and its line, and the other
    40 are examples."""
    rows = [f"plain review {i},{'neg pos'.split()[i % 2]}\n" for i in range(40)]
    rows[20] = '"a quoted review, number 20",pos\n'
    rows.insert(10, '"broken review,neg\n')
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(rows))
    config = load_config([], [f"data.source=csv:{path}", "data.min_count=1", "data.max_bad_fraction=0.1"])
    contract = run_preprocess(config, str(tmp_path / "run"), IN_PROCESS_BEAM)
    assert contract.class_names == ("neg", "pos")
    assert contract.bad_examples == 1 and sum(info.count for info in contract.splits.values()) == 40
    assert dead_letters(tmp_path / "run") == [{
        "key": "row/00000011", "source": f"csv:{path}",
        "reason": f"row 11: unclosed quote: {path} line 12: the quoted field that starts there runs to line 23, "
                  "where its closing quote is followed by 'a', not a comma or a line end; the 11 lines after it are "
                  "read as rows"}]


def test_csv_rows_read_as_before_blank_lines_short_and_long_rows_and_the_limit(tmp_path):
    """What csv.DictReader did, the reader that follows lines still does: blank lines are no rows,
    a short row misses its last columns, data.limit counts data rows (an unclosed quote's row
    among them) and keys stay row numbers. A long row is a dead letter (DictReader kept it)."""
    path = tmp_path / "t.csv"
    path.write_text('text,label,split\n\none,a,test\n\ntwo,b\nthree,a,train,extra\n"broken,b\nfive,a,val\nsix,b\n')
    _, records = records_of(f"csv:{path}")
    assert [(r.key, r.payload, r.label, r.split, r.problem) for r in records] == [
        ("row/00000001", "one", "a", "test", None), ("row/00000002", "two", "b", None, None),
        ("row/00000003", None, "", None, f"row 3: 4 fields, the header names 3 ({path} line 6; quote a field that "
                                         "holds a comma)"),
        ("row/00000004", None, "", None, f"row 4: unclosed quote: {path} line 7: the quoted field that starts there "
                                         "runs to the end of the file; the 2 lines after it are read as rows"),
        ("row/00000005", "five", "a", "validation", None), ("row/00000006", "six", "b", None, None)]
    _, limited = records_of(f"csv:{path}", "data.limit=5")
    assert [r.key for r in limited] == [f"row/{number:08d}" for number in range(1, 6)]
