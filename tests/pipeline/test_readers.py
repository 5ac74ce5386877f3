"""The driver only plans, the workers read: a job graph that does not grow with the data, the
readers of each kind (CSV quoted newlines included), bad input in the readers, and the local
runner mode chosen by the planned input count."""

import csv
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from kcp.core.beamio import IN_PROCESS_BELOW, local_runner_defaults
from kcp.core.config_load import load_config
from kcp.core.sources import BadInput, SourceError, decode_image_file, decode_record, plan_source, read_task
from pipeline import splits
from pipeline.preprocess import build_pipeline, run_preprocess
from tests.conftest import IN_PROCESS_BEAM

TRICKY = ['plain', 'a, comma', 'say "hi"', 'two\nlines', 'quote "and\ncomma", too', '', 'x' * 50]


def write_csv(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def records_of(uri, *overrides):
    plan = plan_source(uri, load_config([], list(overrides)).data)
    return plan, [record for task in plan.tasks for record in read_task(plan, task)]


def graph_bytes(tmp_path, uri, name) -> int:
    config = load_config([], [f"data.source={uri}"])
    pipeline = beam.Pipeline(options=PipelineOptions(IN_PROCESS_BEAM))
    plan = plan_source(uri, config.data)
    build_pipeline(pipeline, plan, config, str(tmp_path / name), str(tmp_path / name / "s.json"), str(tmp_path / "p"))
    return len(pipeline.to_runner_api().SerializeToString())


def test_the_job_graph_does_not_grow_with_the_data(tmp_path):
    """1,000 vs 20,000 CSV rows (and npz rows): the graph holds the plan and its tasks, not the rows."""
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    write_csv(small, [(f"text number {i} " * 8, "ab"[i % 2]) for i in range(1000)])
    write_csv(large, [(f"text number {i} " * 8, "ab"[i % 2]) for i in range(20_000)])
    sizes = [graph_bytes(tmp_path, f"csv:{path}", path.stem) for path in (small, large)]
    assert sizes[1] < 1_000_000 and abs(sizes[1] - sizes[0]) < 1_000, sizes  # the paths differ by a byte
    for rows in (1000, 20_000):
        np.savez(tmp_path / f"{rows}.npz", x=np.zeros((rows, 8, 8), np.uint8), y=np.arange(rows) % 3)
    npz = [graph_bytes(tmp_path, f"npz:{tmp_path / f'{rows}.npz'}", f"n{rows}") for rows in (1000, 20_000)]
    assert npz[1] < 1_000_000 and abs(npz[1] - npz[0]) < 1_000, npz


def test_csv_with_quoted_newlines_commas_and_quotes(tmp_path):
    path = tmp_path / "t.csv"
    rows = [(text, "pq"[i % 2]) for i, text in enumerate(TRICKY * 20)]
    write_csv(path, rows)
    _, records = records_of(f"csv:{path}")
    assert [(r.key, r.payload, r.label) for r in records] == [
        (f"row/{i:08d}", text, label) for i, (text, label) in enumerate(rows, start=1)]
    config = load_config([], [f"data.source=csv:{path}", "data.max_bad_fraction=0.2", "data.min_count=1"])
    contract = run_preprocess(config, str(tmp_path / "run"), IN_PROCESS_BEAM)
    assert contract.bad_examples == 20 and sum(i.count for i in contract.splits.values()) == 120  # the empty texts
    assert contract.class_names == ("p", "q")


def test_npz_rows_are_read_in_ranges_from_the_headers(tmp_path, monkeypatch):
    from kcp.core.sources import arrays

    monkeypatch.setattr(arrays, "TASK_BYTES", 7 * 16)  # 7 rows of 4x4 uint8 per task
    x_train = np.arange(50 * 16, dtype=np.uint8).reshape(50, 4, 4)
    np.savez_compressed(tmp_path / "a.npz", x_train=x_train, y_train=np.arange(50) % 4,
                        x_test=x_train[:9], y_test=np.array(list("abcabcabc")))
    plan, records = records_of(f"npz:{tmp_path / 'a.npz'}")
    assert len(plan.tasks) == 8 + 2 and plan.estimated_count == 59 and plan.class_names == ()
    train = [r for r in records if r.split == "train"]
    assert [r.key for r in train] == [f"train/{i:07d}" for i in range(50)]
    np.testing.assert_array_equal(np.stack([r.payload for r in train]), x_train)
    assert [r.label for r in records if r.split == "test"] == list("abcabcabc")


def test_folder_header_sample_is_bounded_and_spread_over_the_classes(tmp_path, monkeypatch):
    """5 headers of 12 files, from the class folders in turn: class b (after 8 gray images of class a,
    the first 5 files in sorted order) is sampled, and its colour decides the channels."""
    from kcp.core.sources import images

    opened = []
    original = images._image_header
    monkeypatch.setattr(images, "_image_header", lambda path: opened.append(path) or original(path))
    monkeypatch.setattr(images, "HEADER_SAMPLE", 5)
    for index in range(12):
        label, shape = ("a", (3, 4)) if index < 8 else ("b", (3, 4, 3))
        (tmp_path / "img" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "img" / label / f"{index:02d}.png")
    plan, records = records_of(f"folder:{tmp_path / 'img'}")
    assert len(opened) == 5 and plan.input_spec.shape == (3, 4, 3) and len(records) == 12
    assert [os.path.basename(path) for path in opened] == ["00.png", "08.png", "01.png", "09.png", "02.png"]
    assert images.header_sample([["a1", "a2", "a3"], [], ["c1"]]) == ["a1", "c1", "a2", "a3"]
    assert plan.tasks == (("folder", f"{tmp_path}/img/a", "a", None), ("folder", f"{tmp_path}/img/b", "b", None))


# --- bad input in the readers (each raised or crashed before) ------------------------------

def test_a_decompression_bomb_is_a_dead_letter(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # a 20x20 image is then over twice the limit
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "bomb.png")
    with pytest.raises(BadInput, match="DecompressionBombError"):
        decode_image_file(str(tmp_path / "bomb.png"), (20, 20, 1))


def test_a_file_name_that_is_not_utf8_gets_a_usable_key(tmp_path):
    import os

    folder = os.path.join(os.fsencode(tmp_path), b"img", b"cat")
    os.makedirs(folder)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(os.path.join(folder, b"caf\xe9.png"))
    plan, records = records_of(f"folder:{tmp_path / 'img'}")
    assert [r.key for r in records] == ["cat/caf\\xe9.png"]
    splits.stable_split(records[0].key, (0.8, 0.1, 0.1), 42)  # hashes: the key is valid UTF-8
    assert decode_record(plan, records[0]).inputs.shape == (3, 3, 1)  # and the real path still opens


def test_a_csv_field_over_131072_characters_is_read(tmp_path):
    path = tmp_path / "long.csv"
    write_csv(path, [("word " * 40_000, "a"), ("short", "b")])
    _, records = records_of(f"csv:{path}")
    assert [len(r.payload) for r in records] == [200_000, 5]


def test_latin1_rows_are_dead_letters_naming_the_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    write_csv(path, [("caf\xe9 au lait", "a"), ("plain", "b")], encoding="latin-1")
    plan, records = records_of(f"csv:{path}")
    with pytest.raises(BadInput, match="not UTF-8 text"):
        decode_record(plan, records[0], ("a", "b"))
    assert decode_record(plan, records[1], ("a", "b")).inputs == "plain"


def test_a_jsonl_line_that_is_not_an_object_is_a_dead_letter(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n[1, 2]\n"just a string"\nnot json\n')
    plan, records = records_of(f"jsonl:{path}")
    reasons = []
    for record in records:
        try:
            decode_record(plan, record, ("a",))
            reasons.append("ok")
        except BadInput as error:
            reasons.append(str(error))
    assert reasons == ["ok", "line 2: not a JSON object (list)", "line 3: not a JSON object (str)",
                       "line 4: not JSON (Expecting value)"]


def test_npz_with_one_hot_labels_is_a_one_line_error(tmp_path):
    np.savez(tmp_path / "h.npz", x=np.zeros((4, 3, 3), np.uint8), y=np.eye(4, dtype=np.float32))
    with pytest.raises(SourceError, match=r"y has shape \[4, 4\]; expected one label per row.*argmax"):
        plan_source(f"npz:{tmp_path / 'h.npz'}")


# --- the local runner mode ----------------------------------------------------------------

def test_the_local_runner_mode_follows_the_planned_input_count():
    assert local_runner_defaults([], 1797) == ["--runner=FnApiRunner", "--direct_running_mode=in_memory"]
    assert local_runner_defaults([], IN_PROCESS_BELOW)[:2] == ["--runner=FnApiRunner",
                                                                "--direct_running_mode=multi_processing"]
    assert local_runner_defaults(["--direct_running_mode=multi_processing"], 10) == [
        "--runner=FnApiRunner", "--direct_num_workers=" + local_runner_defaults([])[2].split("=")[1],
        "--direct_running_mode=multi_processing"]
    assert local_runner_defaults(["--direct_num_workers=2"], 10) == [
        "--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def test_progress_is_counted_across_bundles_and_reported(tmp_path):
    from kcp.core.beamio import CountProgress, ProgressReporter

    lines = []
    directory = str(tmp_path / "progress")
    with ProgressReporter(directory, 500, lines.append, every=0.05) as reporter:
        with beam.Pipeline(options=PipelineOptions(IN_PROCESS_BEAM)) as pipeline:
            _ = pipeline | beam.Create(range(500)) | beam.ParDo(CountProgress(directory))
        assert reporter.count() == 500
        import time

        time.sleep(0.2)
    assert lines and lines[-1].startswith("progress: 500 of ~500 inputs read")
    assert not (tmp_path / "progress").exists()  # removed when the job ends


DATAFLOW_ARGS = ["--runner=DataflowRunner", "--project=test-project", "--region=us-central1",
                 "--temp_location=gs://kcp-test/dataflow/tmp", "--staging_location=gs://kcp-test/dataflow/staging",
                 "--no_auth", "--dry_run=True", "--sdk_location=container"]


def dataflow_job(gcs, tmp_path, rows: int) -> tuple[int, int]:
    """Builds the job DataflowRunner would submit for a `rows`-row CSV in gs://, stages it on the
    emulator as the runner does before its one API call (create_job_description), and returns
    (bytes of the job request, bytes of the staged pipeline.pb, the graph Dataflow checks)."""
    from apache_beam.runners.dataflow.internal import apiclient

    local = tmp_path / f"{rows}.csv"
    write_csv(local, [(f"text number {i} " * 8, "ab"[i % 2]) for i in range(rows)])
    gcs.bucket("kcp-test").blob(f"dataflow/{rows}.csv").upload_from_filename(str(local))
    uri = f"csv:gs://kcp-test/dataflow/{rows}.csv"
    config = load_config([], [f"data.source={uri}"])
    options = PipelineOptions(DATAFLOW_ARGS + [f"--job_name=kcp-dry-run-{rows}"])
    pipeline = beam.Pipeline(options=options)
    data_dir = f"gs://kcp-test/dataflow/run{rows}/data"
    build_pipeline(pipeline, plan_source(uri, config.data), config, data_dir, f"{data_dir}/s.json", f"{data_dir}/.p")
    job = pipeline.run().job  # --dry_run: everything but the staging and the API call
    apiclient.DataflowApplicationClient(options, job.root_staging_location).create_job_description(job)
    prefix = job.google_cloud_options.staging_location[len("gs://kcp-test/"):] + "/"
    staged = {blob.name[len(prefix):]: blob.size for blob in gcs.list_blobs("kcp-test", prefix=prefix)}
    assert "pipeline.pb" in staged, staged
    return len(job.json().encode("utf-8")), staged["pipeline.pb"]


def test_the_dataflow_job_is_small_and_does_not_grow_with_the_data(gcs, tmp_path):
    """DataflowRunner, offline: --dry_run builds the job it would submit and the emulator takes
    the staging. Dataflow refuses a job graph over 10 MB; ours stays under 1 MB for 1,000 and
    20,000 rows, and the same size to within the paths' length."""
    small, large = dataflow_job(gcs, tmp_path, 1000), dataflow_job(gcs, tmp_path, 20_000)
    for request, pipeline in (small, large):
        assert 0 < request + pipeline < 1_000_000, (small, large)
    assert abs(large[0] - small[0]) < 1_000 and abs(large[1] - small[1]) < 1_000, (small, large)
