"""RUN/data's lifecycle around a preprocessing job: the job writes into a staging folder, which is
published over the run's earlier data only once it has succeeded; a killed or failed run's
folders are cleared by the next one."""

from __future__ import annotations

from kcp.core import contract as contract_lib
from kcp.core import storage
from kcp.core.layout import DEAD_LETTER_DIR
from pipeline import splits

PARTS_PREFIX = ".parts-"  # per-bundle record parts while the shards are written
SUMMARY_PREFIX = ".summary-"  # what the pipeline measured, read by the driver, then removed
STAGING_PREFIX = ".attempt-"  # the new shards and dead letters until the run succeeds (or, failed, its dead letters)


def remove_shards(folder: str) -> None:
    """Removes every split's TFRecord shards in `folder`."""
    for split in splits.SPLITS:
        for path in storage.glob(storage.join(folder, f"{split}-*.tfrecord*")):
            storage.remove(path)


def clear_previous_outputs(data_dir: str) -> None:
    """Removes an earlier run's contract first, then its shards and dead letters, so a crash never looks complete."""
    storage.remove(storage.join(data_dir, contract_lib.METADATA_FILE))
    remove_shards(data_dir)
    storage.remove_tree(storage.join(data_dir, DEAD_LETTER_DIR))


def clear_leftovers(data_dir: str) -> None:
    """Removes what only an earlier run that was killed or failed leaves: its record parts, summary
    and staging folder (listed, not globbed: on gs:// a folder is no object, so `.parts-*` matches nothing)."""
    for name in storage.list_dir(data_dir):
        if name.startswith((PARTS_PREFIX, STAGING_PREFIX)):
            storage.remove_tree(storage.join(data_dir, name))
        elif name.startswith(SUMMARY_PREFIX):
            storage.remove(storage.join(data_dir, name))


def publish(staging: str, data_dir: str) -> None:
    """Replaces RUN/data's shards, dead letters and files with the staging folder's: the earlier
    contract goes first, so that until the new one is written nothing looks complete."""
    clear_previous_outputs(data_dir)
    storage.makedirs(storage.join(data_dir, DEAD_LETTER_DIR))  # there, empty, when no input was bad
    for name in storage.list_files(staging):
        storage.rename(storage.join(staging, name), storage.join(data_dir, name))
    storage.remove_tree(staging)


def discard(staging: str, data_dir: str, earlier: bool) -> None:
    """A failed job's staging folder: its shards go; its dead letters stay there while `earlier`
    data (whose own dead letters RUN/data keeps) are still in place, else they are published."""
    remove_shards(staging)
    if earlier:
        storage.remove_empty_folder(staging)
    else:
        publish(staging, data_dir)
