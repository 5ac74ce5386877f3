"""kcp.core.storage: the local backend, backend choice, and a gs:// round trip through Beam's
FileSystems against the GCS emulator."""

import gzip
import os
import subprocess
import sys

import pytest

from kcp.core import storage


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "sub" / "a.json")
    storage.write_text_atomic(path, "old")
    storage.write_text_atomic(path, "new")
    assert storage.read_text(path) == "new"
    assert os.listdir(tmp_path / "sub") == ["a.json"]


def test_failed_atomic_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "a.json")
    storage.write_text_atomic(path, "old")
    renames = []

    def failing_replace(source, target):
        renames.append((source, target))
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        storage.write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert len(renames) == 1 and renames[0][0].startswith(path + ".tmp-") and renames[0][1] == path
    assert os.listdir(tmp_path) == ["a.json"]
    assert storage.read_text(path) == "old"


def test_local_listing_globbing_and_removal(tmp_path):
    base = str(tmp_path)
    for name in ("c.txt", "a.txt", "b.log"):
        storage.write_text_atomic(storage.join(base, name), name)
    storage.makedirs(storage.join(base, "d", "e"))
    assert storage.list_dir(base) == ["a.txt", "b.log", "c.txt", "d"]
    assert storage.list_dir(storage.join(base, "missing")) == []
    assert storage.glob(storage.join(base, "*.txt")) == [storage.join(base, "a.txt"), storage.join(base, "c.txt")]
    assert storage.exists(storage.join(base, "d", "e")) and not storage.exists(storage.join(base, "nope"))

    storage.remove(storage.join(base, "missing.txt"))  # absent: a no-op
    storage.remove_tree(storage.join(base, "missing"))  # absent: a no-op
    storage.remove(storage.join(base, "b.log"))
    storage.remove_tree(storage.join(base, "d"))
    storage.rename(storage.join(base, "c.txt"), storage.join(base, "z.txt"))
    assert storage.list_dir(base) == ["a.txt", "z.txt"]
    assert storage.read_text(storage.join(base, "z.txt")) == "c.txt"


def test_backend_for_picks_one_backend_per_scheme(tmp_path, monkeypatch):
    local = storage.backend_for(str(tmp_path / "a.yaml"))
    assert type(local) is storage.LocalBackend
    assert storage.backend_for(tmp_path / "b.yaml") is local  # a pathlib.Path is local too
    beam = storage.backend_for("gs://bucket/a.json")
    assert type(beam) is storage.BeamBackend and storage.backend_for("gs://other/b") is beam

    # A scheme Beam has no filesystem for falls back to tf.io.gfile (TensorFlow is not imported here).
    monkeypatch.setattr(storage, "_BACKENDS", {})
    monkeypatch.setattr(storage.GfileBackend, "__init__", lambda self: None)
    assert type(storage.backend_for("kcp-no-such-scheme://x/y")) is storage.GfileBackend


def test_gfile_backend_renames_over_the_target_unless_told_not_to_and_writes_with_overwrite():
    calls = []

    class AlreadyExists(Exception):
        pass

    class FakeGfile:
        class GFile:
            def __init__(self, path, mode):
                calls.append(("open", path, mode))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def write(self, content):
                calls.append(("write", content))

        @staticmethod
        def rename(source, target, overwrite):
            calls.append(("rename", source, target, overwrite))
            if not overwrite and target == "x://taken":
                raise AlreadyExists("file already exists")

    backend = storage.GfileBackend.__new__(storage.GfileBackend)
    backend.gfile, backend.already_exists = FakeGfile, AlreadyExists
    backend.rename("x://a", "x://b")  # storage.rename's meaning: replace the target
    assert calls == [("rename", "x://a", "x://b", True)]
    calls.clear()
    with pytest.raises(FileExistsError, match="x://taken exists"):
        backend.rename("x://a", "x://taken", overwrite=False)
    assert calls == [("rename", "x://a", "x://taken", False)]
    calls.clear()
    backend.write_bytes_atomic("x://c", b"data")
    temporary = calls[0][1]
    assert temporary.startswith("x://c.tmp-")
    assert calls == [("open", temporary, "wb"), ("write", b"data"), ("rename", temporary, "x://c", True)]


@pytest.mark.parametrize("backend", ["local", "gfile"])
def test_a_rename_replaces_the_target_and_one_without_overwrite_never_does(tmp_path, backend):
    """rename(overwrite=True) replaces (a rerun's model.keras over the old one); overwrite=False
    fails with FileExistsError and leaves both files as they were, on a local path through the
    local backend and through tf.io.gfile."""
    chosen = storage.LocalBackend() if backend == "local" else storage.GfileBackend()
    base = str(tmp_path)
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text(name)
    chosen.rename(f"{base}/a", f"{base}/b")
    assert sorted(os.listdir(base)) == ["b", "c"] and (tmp_path / "b").read_text() == "a"
    with pytest.raises(FileExistsError, match="/b exists"):
        chosen.rename(f"{base}/c", f"{base}/b", overwrite=False)
    assert (tmp_path / "b").read_text() == "a" and (tmp_path / "c").read_text() == "c"
    chosen.rename(f"{base}/c", f"{base}/d", overwrite=False)
    assert sorted(os.listdir(base)) == ["b", "d"] and (tmp_path / "d").read_text() == "c"


def test_reading_a_local_file_imports_neither_tensorflow_nor_beam(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    code = ("import sys; from kcp.core import storage; "
            f"assert storage.read_text({str(path)!r}) == 'a: 1\\n'; storage.list_dir({str(tmp_path)!r}); "
            "print(sorted(m for m in ('tensorflow', 'apache_beam') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.stdout.strip() == "[]"


def test_gcs_round_trip_through_beam(gcs):
    base = "gs://kcp-test/storage-test"
    assert type(storage.backend_for(base)) is storage.BeamBackend
    storage.makedirs(base)  # object stores need no folders: nothing is written
    assert not storage.exists(base) and storage.list_dir(base) == []

    storage.write_text_atomic(f"{base}/a.json", "first")
    storage.write_text_atomic(f"{base}/a.json", "second")  # overwrites an existing object
    storage.write_bytes_atomic(f"{base}/sub/b.txt", b"bee")
    storage.write_text_atomic(f"{base}/sub/deeper/c.txt", "sea")
    assert storage.read_text(f"{base}/a.json") == "second"
    packed = gzip.compress(b"record")  # a .gz object's bytes as they are, neither packed nor unpacked by its name
    storage.write_bytes_atomic(f"{base}/shard.tfrecord.gz", packed)
    assert storage.read_bytes(f"{base}/shard.tfrecord.gz") == packed
    assert gcs.bucket("kcp-test").blob("storage-test/shard.tfrecord.gz").download_as_bytes() == packed
    storage.remove(f"{base}/shard.tfrecord.gz")
    assert sorted(blob.name for blob in gcs.list_blobs("kcp-test", prefix="storage-test/")) == [
        "storage-test/a.json", "storage-test/sub/b.txt", "storage-test/sub/deeper/c.txt"]  # no temporaries

    assert storage.exists(f"{base}/a.json")  # a file
    assert storage.exists(base) and storage.exists(f"{base}/sub") and storage.exists(f"{base}/sub/")  # "folders"
    assert not storage.exists(f"{base}/su") and not storage.exists(f"{base}/missing.json")
    assert storage.list_dir(base) == ["a.json", "sub"]
    assert storage.list_dir(f"{base}/sub/") == ["b.txt", "deeper"]
    assert storage.list_dir(f"{base}/missing") == []
    assert storage.glob(f"{base}/*") == [f"{base}/a.json"]  # `*` stops at "/"
    assert storage.glob(f"{base}/**.txt") == [f"{base}/sub/b.txt", f"{base}/sub/deeper/c.txt"]

    storage.rename(f"{base}/a.json", f"{base}/sub/a.json")
    assert not storage.exists(f"{base}/a.json") and storage.read_text(f"{base}/sub/a.json") == "second"
    storage.remove(f"{base}/missing.json")  # absent: a no-op
    storage.remove_tree(f"{base}/missing")  # absent: a no-op
    storage.remove_tree(f"{base}/sub")
    assert not storage.exists(f"{base}/sub") and storage.list_dir(base) == []
    assert list(gcs.list_blobs("kcp-test", prefix="storage-test/")) == []


@pytest.mark.parametrize("backend", ["beam", "gfile"])
def test_a_gcs_rename_without_overwrite_is_refused_by_a_generation_precondition(gcs, backend, monkeypatch):
    """On gs:// a rename that must not overwrite is a server-side copy with ifGenerationMatch=0
    (the emulator answers 412 as GCS does): it never replaces the target, and the source stays."""
    chosen = storage.BeamBackend() if backend == "beam" else storage.GfileBackend()
    base = f"gs://kcp-test/rename-{backend}-{os.getpid()}"
    for name in ("a", "b", "c"):
        storage.write_text_atomic(f"{base}/{name}", name)
    checked = []
    real_exists = type(chosen).exists
    monkeypatch.setattr(type(chosen), "exists", lambda self, p: checked.append(p) or real_exists(self, p))
    with pytest.raises(FileExistsError, match=f"{base}/b exists"):
        chosen.rename(f"{base}/a", f"{base}/b", overwrite=False)
    assert checked == []  # refused by the precondition, not by a check before the copy
    assert storage.read_text(f"{base}/a") == "a" and storage.read_text(f"{base}/b") == "b"
    chosen.rename(f"{base}/a", f"{base}/d", overwrite=False)
    assert storage.read_text(f"{base}/d") == "a" and not storage.exists(f"{base}/a")
    if backend == "beam":  # the default replaces, as storage.rename promises
        chosen.rename(f"{base}/c", f"{base}/b")
        assert storage.read_text(f"{base}/b") == "c" and not storage.exists(f"{base}/c")
    storage.remove_tree(base)


def test_against_an_emulator_beam_gcs_goes_anonymous_at_once(gcs_emulator):
    """A user trying gs:// on a local emulator (STORAGE_EMULATOR_HOST and no Google credentials):
    Beam's gcsio retried Google's credential lookup for ~20 s, a traceback each time, before it
    fell back to the anonymous client the emulator takes."""
    import subprocess
    import sys

    script = ("from kcp.core import storage; storage.write_bytes_atomic('gs://kcp-test/anon/x', b'1'); "
              "print(storage.exists('gs://kcp-test/anon/x'), storage.read_bytes('gs://kcp-test/anon/x'))")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GOOGLE_", "STORAGE_EMULATOR", "CLOUDSDK"))}
    env.update(STORAGE_EMULATOR_HOST=gcs_emulator.host, HOME=os.environ.get("HOME", "/tmp"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "True b'1'"
    assert "DefaultCredentialsError" not in result.stderr and "Retry with exponential backoff" not in result.stderr


def test_a_gs_output_without_credentials_is_one_line_before_any_work(digits_run, tmp_path, monkeypatch, capsys):
    """`kcp predict --output gs://…` with no Google credentials: Beam's gcsio went on anonymously
    and retried for 2 min 18 s before a traceback and a line about a RetryError; the run
    directory, --output and push's --to are checked at once now. Reading needs no check (a
    public bucket), and neither does an emulator."""
    from kcp import cli
    from kcp.core import remote

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # google.auth: no metadata server to ask on this machine
    monkeypatch.setattr(remote, "_CREDENTIALS_FOUND", set())
    inputs = tmp_path / "in.csv"
    inputs.write_text("x\n")
    commands = [["predict", "--run-dir", digits_run, "--input", f"csv:{inputs}", "--output", "gs://kcp-b/out"],
                ["push", "--run-dir", digits_run, "--to", "gs://kcp-b/models/digits"],
                ["train", "--run-dir", "gs://kcp-b/runs/r1"]]
    for argv, target in zip(commands, ["gs://kcp-b/out", "gs://kcp-b/models/digits", "gs://kcp-b/runs/r1"]):
        assert cli.main(argv) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert error == [f"kcp {argv[0]}: error: {target}: no Google Cloud credentials to write there (File "
                         f"{tmp_path / 'missing-key.json'} was not found); run `gcloud auth application-default "
                         "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file"], error
    remote.check_write_credentials([str(tmp_path), None])  # local paths: nothing to check
    from kcp.cli import WRITES_RUN_DIR  # a command that only reads a gs:// run directory (a public bucket) is not

    assert "serve" not in WRITES_RUN_DIR and "versions" not in WRITES_RUN_DIR and "predict" not in WRITES_RUN_DIR
    assert {"preprocess", "train", "tune", "export", "validate", "run", "report"} <= set(WRITES_RUN_DIR)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    remote.check_write_credentials(["gs://kcp-b/out"])  # an emulator takes anonymous writes
