"""What a batch prediction writes, and the care around it: the output prefix, the shards of one
job, clearing what an earlier job to the same prefix left, a lock so that two jobs never share a
prefix, and the closing counts line.

A job holds PREFIX's lock (`FOLDER/.kcp-predict-NAME/.kcp-lock`, kcp/core/lock.py: created in
one atomic step, taken over when its holder on this host is gone) from before it clears the
earlier outputs until its own are written: a second job on the same prefix fails at once with one
line, rather than deleting the first one's files. Nothing is removed that the job reads: an
--output that names the --input file (or one of its files) is refused first.
"""

from __future__ import annotations

import contextlib
import os
import re

from apache_beam.metrics import MetricsFilter

from kcp.core import lock, storage
from kcp.core.errors import UserError

COUNTERS = "kcp.predict"  # the Beam metrics namespace of the predicted and failed counts


def output_prefix(output: str) -> str:
    """OUTPUT less a trailing .jsonl; refused (one line) when it names a folder rather than a file prefix."""
    if not isinstance(output, str) or not output.strip():
        raise UserError(f"--output: expected a file prefix such as preds/p, got {output!r}")
    if output.endswith("/") or (not storage.is_remote(output) and os.path.isdir(output)):
        raise UserError(f"--output: {output} is a folder; give a file prefix inside it, such as "
                        f"{storage.join(output.rstrip('/'), 'predictions')}")
    return output[:-len(".jsonl")] if output.endswith(".jsonl") else output


def job_files(prefix: str, kind: str = "") -> list[str]:
    """The shards a job writes to PREFIX (`kind` ".dead_letter": its dead letters), sorted: exactly
    PREFIX-NNNNN-of-NNNNN.jsonl, not those of another prefix that begins with PREFIX- ("preds-2024")."""
    name = re.escape(prefix.rsplit("/", 1)[-1] + kind)
    shard = re.compile(rf"{name}-\d{{5}}-of-\d{{5}}\.jsonl")
    return sorted(path for path in storage.glob(f"{prefix}{kind}-*-of-*.jsonl")
                  if shard.fullmatch(path.rsplit("/", 1)[-1]))


def _same_file(path: str) -> str:
    return path if storage.is_remote(path) else os.path.realpath(path)


@contextlib.contextmanager
def output_claimed(output: str, prefix: str, single_file: bool, inputs: list[str]):
    """Holds PREFIX's lock while the body writes, after removing what an earlier prediction to the
    same prefix wrote (its shards and dead letters, sharded or single-file alike, and a killed job's
    beam-temp folders), so that every file there after this job is its own. One-line UserErrors:
    a folder that cannot be written, another job on the prefix, an --output among the `inputs`."""
    def earlier() -> list[str]:  # a sharded job removes a single-file one's PREFIX.jsonl, not a file it was not given
        return [output if single_file else f"{prefix}.jsonl", f"{prefix}.dead_letter.jsonl", *job_files(prefix),
                *job_files(prefix, ".dead_letter")]

    read = {_same_file(path) for path in inputs if path}
    clash = next((path for path in earlier() if _same_file(path) in read), None)
    if clash:
        raise UserError(f"--output: {clash} is an input this job reads; give the predictions another path")
    folder, name = prefix.rsplit("/", 1) if "/" in prefix else (".", prefix)
    claim = storage.join(folder, f".kcp-predict-{name}")
    try:
        storage.makedirs(claim)
        lock.acquire(claim, "predict")
    except lock.RunLockedError as error:
        holder = str(error).split(" is in use by ", 1)
        raise UserError(f"--output: {prefix} is being written by another job, {holder[1]}" if len(holder) == 2
                        else f"--output: {error}") from None
    except OSError as error:  # a parent that is a file, a folder that may not be written
        raise UserError(f"--output: cannot write in {folder} ({error.strerror or error})") from None
    try:
        for path in earlier():  # listed again under the lock: a job that ended meanwhile left its shards
            storage.remove(path)
        # Beam's temporary folders: beam-temp-NAME-<uuid1 hex>; on gs:// a "folder" is its objects' prefix
        temporary = re.compile(rf"beam-temp-{re.escape(name)}(\.dead_letter)?-[0-9a-f]{{32}}")
        found = {path.rstrip("/") for path in storage.glob(storage.join(folder, f"beam-temp-{name}*"))}
        found |= {path.rsplit("/", 1)[0] for path in storage.glob(storage.join(folder, f"beam-temp-{name}*", "*"))}
        for path in sorted(found):
            if temporary.fullmatch(path.rsplit("/", 1)[-1]):
                storage.remove_tree(path)
        yield
    finally:
        lock.release(claim)
        storage.remove_empty_folder(claim)


def counts_line(result, dead_letters: str) -> str:
    """"predicted N, failed M -> DEAD LETTERS" from the job's counters (the failed: unreadable inputs
    and failed predictions)."""
    counts = {"predicted": 0, "failed": 0}
    for counter in result.metrics().query(MetricsFilter().with_namespace(COUNTERS))["counters"]:
        try:
            value = counter.committed
        except Exception:  # noqa: BLE001  a runner without committed metrics
            value = None
        counts[counter.key.metric.name] += value if value is not None else counter.attempted
    found = storage.glob(dead_letters) if counts["failed"] else []
    where = f" -> {found[0] if len(found) == 1 else dead_letters}" if counts["failed"] else ""
    return f"predicted {counts['predicted']:,}, failed {counts['failed']:,}{where}"
