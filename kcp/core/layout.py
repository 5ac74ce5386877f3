"""The run directory, the interface between the stages: every path a stage reads or writes.

    layout = RunLayout("runs/digits")          # or RunLayout("gs://bucket/runs/r1")
    layout.metadata                            # runs/digits/data/metadata.json
    layout.version_dir("model")                # the newest export version, e.g. .../export/model/3

Stages never build these paths themselves, so renaming a file is a change in one place.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

from kcp.core import storage
from kcp.core.errors import UserError

SPLITS = ("train", "validation", "test")
# the names a source's split folders (folder:) or arrays (npz: x_<name>) may have -> the split
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
               "test": "test"}
RUNS_ROOT = "runs"  # where runs go when no run directory is named
DEAD_LETTER_DIR = "dead_letter"  # under RUN/data/
MERGES_FILE = "merges.txt"  # under RUN/data/ (bpe)
VOCABULARY_JSON_FILE = "vocab.json"  # under RUN/data/ (bpe)
FINGERPRINT = "kcp_fingerprint.json"  # under VERSION/assets.extra/: what an export was made from


@dataclass(frozen=True)
class RunLayout:
    """Paths under one run directory `root` (a local path or a `gs://` URI)."""

    root: str

    def _join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def config(self) -> str:
        return self._join("config.yaml")

    # --- data: written by the pipeline ---------------------------------------------------
    @property
    def data(self) -> str:
        return self._join("data")

    @property
    def metadata(self) -> str:
        return self._join("data", "metadata.json")

    @property
    def labels(self) -> str:
        return self._join("data", "labels.txt")

    @property
    def vocabulary(self) -> str:
        return self._join("data", "vocab.txt")

    @property
    def merges(self) -> str:  # bpe language runs: the merges, GPT-2's merges.txt
        return self._join("data", MERGES_FILE)

    @property
    def vocabulary_json(self) -> str:  # bpe language runs: token -> id, GPT-2's vocab.json
        return self._join("data", VOCABULARY_JSON_FILE)

    @property
    def dead_letter(self) -> str:
        return self._join("data", DEAD_LETTER_DIR)

    @property
    def samples(self) -> str:
        return self._join("data", "samples.png")

    # --- train: written by the trainer ---------------------------------------------------
    @property
    def train(self) -> str:
        return self._join("train")

    @property
    def model(self) -> str:
        return self._join("train", "model.keras")

    @property
    def metrics(self) -> str:
        return self._join("train", "metrics.json")

    @property
    def history(self) -> str:
        return self._join("train", "history.json")

    @property
    def confusion_matrix(self) -> str:
        return self._join("train", "confusion_matrix.json")

    # --- tuning, report ------------------------------------------------------------------
    @property
    def tuning(self) -> str:
        return self._join("tuning")

    @property
    def best_hparams(self) -> str:
        return self._join("tuning", "best_hparams.json")

    @property
    def report(self) -> str:
        return self._join("report")

    # --- export: RUN/export/NAME/VERSION ---------------------------------------------------
    @property
    def exports(self) -> str:
        return self._join("export")

    def export_root(self, name: str) -> str:
        return self._join("export", name)

    def versions(self, name: str) -> list[int]:
        """The complete version folders under RUN/export/NAME (saved_model.pb present), ascending.
        Temporaries are not versions, nor a version an export killed halfway left on gs://."""
        return export_versions(self.export_root(name))

    def version_claims(self, name: str) -> str:
        """RUN/export/NAME/.claims/: one object per version number an export has claimed (gs://)."""
        return self._join("export", name, ".claims")

    def next_version(self, name: str) -> int:
        """One above every version number in use: complete, partial (a killed export) or claimed."""
        root = self.export_root(name)
        taken = [int(n) for n in storage.list_dir(root) if n.isdigit()]
        taken += [int(n) for n in storage.list_dir(self.version_claims(name)) if n.isdigit()]
        return max(taken, default=0) + 1

    def version_dir(self, name: str, version: int | None = None) -> str:
        """RUN/export/NAME/VERSION; the newest version when `version` is None."""
        root, versions = self.export_root(name), self.versions(name)
        if not versions:
            raise UserError(f"{root}: no exported version; run `kcp export --run-dir {self.root}` first")
        if version is None:
            version = versions[-1]
        elif isinstance(version, bool) or not isinstance(version, int):
            raise UserError(f"--version: expected an integer version, got {version!r}")
        elif version not in versions:
            raise UserError(f"--version: {version} is not exported under {root} "
                            f"(it has {', '.join(map(str, versions))})")
        return storage.join(root, str(version))


def export_versions(export_root: str) -> list[int]:
    """The complete integer version folders directly under one model's export folder, ascending:
    those holding saved_model.pb, which every export and push writes last."""
    return sorted(int(name) for name in storage.list_dir(export_root)
                  if name.isdigit() and storage.exists(storage.join(export_root, name, "saved_model.pb")))


def validation_record(version_dir: str) -> str:
    """VERSION/assets.extra/validation.json: kcp validate's verdict, which travels with the model."""
    return storage.join(version_dir, "assets.extra", "validation.json")


def version_files_sha256(version_dir: str) -> dict | None:
    """{relative path: sha256} of a local export version's files, its validation.json left out: what
    `kcp validate` validated, which push and predict check before they use the version. None on
    gs://: TensorFlow's own client writes an export there, and reading every file back through
    Beam's client would double the transfer (versions there are checked by their saved_model.pb)."""
    if storage.is_remote(version_dir):
        return None
    record = "assets.extra/validation.json"
    return {relative: storage.sha256(storage.join(version_dir, relative))
            for relative in storage.list_files(version_dir) if relative != record}


def check_unchanged_since_validation(version_dir: str, validation: dict | None) -> None:
    """A one-line error when a file of a validated version changed (or went, or came) after
    `kcp validate` recorded its digests: what was blessed is not what would be used."""
    recorded = (validation or {}).get("files_sha256")
    if not isinstance(recorded, dict) or storage.is_remote(version_dir):
        return  # not validated, validated before the digests were recorded, or on gs://
    found = version_files_sha256(version_dir)
    changed = sorted(name for name in set(recorded) | set(found) if recorded.get(name) != found.get(name))
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise UserError(f"{storage.join(version_dir, changed[0])}{more}: changed since `kcp validate` validated this "
                        "version (its sha256 differs from validation.json's); export and validate again")


def read_verdict(version_dir: str) -> dict | None:
    """kcp validate's validation.json of a version, or None when there is none (never validated, or
    gone meanwhile); a record that is not a JSON mapping reads as a verdict that blesses nothing."""
    import json

    path = validation_record(version_dir)
    try:
        record = json.loads(storage.read_text(path)) if storage.exists(path) else None
    except OSError:  # gone meanwhile
        return None
    except ValueError:
        return {"blessed": False, "reasons": [f"{path} is not valid JSON"]}
    return record if isinstance(record, dict) or record is None else {"blessed": False, "reasons": []}


def is_blessed(version_dir: str) -> bool:
    """True when kcp validate blessed this export version (a missing or unreadable record: False)."""
    return (read_verdict(version_dir) or {}).get("blessed") is True


def newest_blessed(export_root: str, exclude: int | None = None) -> int | None:
    """The newest complete version under one model's export folder that kcp validate blessed, or None."""
    if not storage.exists(export_root):
        return None
    return next((version for version in reversed(export_versions(export_root))
                 if version != exclude and is_blessed(storage.join(export_root, str(version)))), None)


def run_path(run_dir, who: str) -> str:
    """`run_dir` as the str every stage takes (a pathlib.Path is one; `~` is the home folder, as a
    shell would read it), or a one-line error naming `who`."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise UserError(f"{who}: run_dir must be a path (str), got {type(run_dir).__name__} {run_dir!r}")
    path = os.fspath(run_dir)
    if not path.strip():
        raise UserError(f"{who}: run_dir is empty; give a folder such as runs/digits")
    return path if storage.is_remote(path) else os.path.expanduser(path)


def takes_run_dir(function):
    """Wraps an API function whose first argument is the run directory with `run_path`."""
    @functools.wraps(function)
    def wrapper(run_dir, *args, **kwargs):
        return function(run_path(run_dir, function.__name__), *args, **kwargs)
    return wrapper


def new_run_dir(root: str = RUNS_ROOT) -> str:
    """A fresh local `ROOT/<UTC timestamp>` (with a suffix when that name is taken), created here.

    The folder is claimed with os.mkdir, which fails when it exists, so two runs started in the
    same second get different folders (checking first and creating later would hand both the same one).
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(root, exist_ok=True)
    suffix = 1
    while True:
        candidate = os.path.join(root, stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            suffix += 1


def newest_run(root: str = RUNS_ROOT) -> str | None:
    """The most recently changed local run under `root` that has preprocessed data, or None."""
    if not os.path.isdir(root):
        return None
    runs = [os.path.join(root, name) for name in os.listdir(root)]
    runs = [run for run in runs if os.path.exists(RunLayout(run).metadata)]
    return max(runs, key=os.path.getmtime) if runs else None
