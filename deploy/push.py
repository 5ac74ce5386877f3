"""Copy a blessed export version to Cloud Storage with the google-cloud-storage client.

    kcp push --run-dir runs/digits --to gs://BUCKET/models/digits [--version N] [--dest-version M|next] [--force]

Files are uploaded under gs://BUCKET/models/digits/N/ (or M: `next` is one above the highest
version there) with saved_model.pb last. A push that would land below a version the destination
already holds is refused unless that is asked for by number: TF Serving serves the highest
version, so the pushed model would never be served. TF Serving only loads a version folder once
saved_model.pb is there, so it never loads a half-copied one. A complete destination version (saved_model.pb present) is never overwritten; an
incomplete one, left by a push that was killed halfway, is completed by pushing again (from
another host, once the killed push's lock is deleted: the error names it). Two pushes to the same
destination version at once cannot mix their files: each holds the version's lock
(DESTINATION/.kcp-push-VERSION/.kcp-lock, kcp/core/lock.py, created with ifGenerationMatch=0;
beside the version, which a model server polling DESTINATION ignores) while it uploads, and the
second one fails at once naming the first. The run directory may be local or on
gs:// (then the files are copied within Cloud Storage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading

from kcp.core import lock, storage
from kcp.core.errors import UserError
from kcp.core.layout import FINGERPRINT, check_unchanged_since_validation, newest_blessed, validation_record

log = logging.getLogger("kcp.push")


BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")  # Cloud Storage's naming rules, in short


def split_gs_uri(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("gs://") or len(uri) <= 5:
        raise UserError(f"--to: {uri!r} is not a gs://BUCKET/PATH URI")
    bucket, _, prefix = uri[5:].partition("/")
    if not BUCKET_NAME.match(bucket) or ".." in bucket:
        raise UserError(f"--to: {bucket!r} is not a bucket name (3-222 lowercase letters, digits, '-', '_' and '.', "
                        "starting and ending with a letter or digit)")
    return bucket, prefix.strip("/")


def destination_versions(client, bucket_name: str, prefix: str) -> list[int]:
    """The complete versions (a saved_model.pb in a numbered folder) under gs://BUCKET/PREFIX/, sorted."""
    base = f"{prefix}/" if prefix else ""
    pattern = re.compile(rf"^{re.escape(base)}(\d+)/saved_model\.pb$")
    return sorted({int(match.group(1)) for blob in client.list_blobs(bucket_name, prefix=base)
                   if (match := pattern.match(blob.name))})


def destination_version(held: list[int], bucket_name: str, prefix: str, version: int, dest_version) -> int:
    """The version folder a push writes: `dest_version` (a number, or "next": one above the highest
    there), else the export's own number, refused when the destination holds (`held`) a higher one."""
    where = f"gs://{bucket_name}/{prefix}" if prefix else f"gs://{bucket_name}"
    if dest_version == "next":
        return (held[-1] + 1) if held else version
    if dest_version is not None:
        if isinstance(dest_version, bool) or not isinstance(dest_version, int) or dest_version < 1:
            raise UserError(f"--dest-version: expected a version number from 1, or next; got {dest_version!r}")
        return dest_version
    if held and held[-1] > version:
        raise UserError(f"--to: {where} holds version {held[-1]}, above this export's {version}: TF Serving serves "
                        f"the highest, so this model would not be served; push with --dest-version next "
                        f"({held[-1] + 1}), or --dest-version {version} to place it below on purpose")
    return version


def read_validation(version_dir: str) -> dict | None:
    path = validation_record(version_dir)
    if not storage.exists(path):
        return None
    try:
        validation = json.loads(storage.read_text(path))
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error}); run `kcp validate` again") from None
    if not isinstance(validation, dict):
        raise UserError(f"{path}: holds {type(validation).__name__}, not a validation record; "
                        "run `kcp validate` again")
    return validation


def push_export(version_dir: str, destination: str, force: bool = False, client=None,
                dest_version=None, max_regression: float | None = None) -> list[str]:
    """Uploads `version_dir` (local or gs://) to DESTINATION/VERSION/ (`destination_version`);
    returns the gs:// URIs written, saved_model.pb last. Unless `force`, a version that would
    replace the destination's highest (the one a server serves) is refused when it scored more
    than `max_regression` below it on the same data contract (`check_not_worse_than_served`)."""
    from google.api_core.exceptions import GoogleAPICallError
    from google.cloud import storage as gcs

    validation = read_validation(version_dir)
    if not force:
        if validation is None:
            raise UserError(f"{version_dir}: not validated; run `kcp validate` first (or push with --force)")
        if not validation.get("blessed"):
            blessed = newest_blessed(os.path.dirname(version_dir.rstrip("/")))
            other = f"push --version {blessed}, the newest blessed one, or " if blessed else ""
            raise UserError(f"{version_dir}: not blessed ({'; '.join(validation.get('reasons', []))}); "
                            f"{other}push with --force to push it anyway")
        check_unchanged_since_validation(version_dir, validation)
    bucket_name, prefix = split_gs_uri(destination)
    files = storage.list_files(version_dir)
    if "saved_model.pb" not in files:
        raise UserError(f"{version_dir}: no saved_model.pb; not a complete export version")
    client = client or gcs.Client()
    try:
        held = destination_versions(client, bucket_name, prefix)
        version = str(destination_version(held, bucket_name, prefix,
                                          int(version_dir.rstrip("/").replace(os.sep, "/").rsplit("/", 1)[-1]),
                                          dest_version))
        if not force and max_regression is not None and held and int(version) > held[-1]:
            check_not_worse_than_served(client.bucket(bucket_name), prefix, held[-1], version_dir, validation,
                                        max_regression)
    except GoogleAPICallError as error:  # a missing bucket, credentials that may not list it, a bad name
        raise _destination_error(error, bucket_name, prefix) from None
    target = f"{prefix}/{version}" if prefix else version
    # the destination version's lock, beside it (BASE/.kcp-push-VERSION/.kcp-lock, which a model server
    # polling BASE ignores), not in it: a push killed after its last file leaves no stray object in the model
    claim = f"gs://{bucket_name}/{prefix + '/' if prefix else ''}.kcp-push-{version}"
    with _in_this_process(claim, f"gs://{bucket_name}/{target}/"):
        try:
            lock.acquire(claim, "push")
        except GoogleAPICallError as error:  # a missing bucket, or credentials that may not write there
            raise _destination_error(error, bucket_name, target) from None
        try:
            return _upload(client, bucket_name, target, version_dir, files)
        except GoogleAPICallError as error:
            if storage.is_remote(version_dir):  # the source bucket or the destination's: name both
                detail = " ".join(str(getattr(error, "message", error)).split())[:200]
                raise UserError(f"push {version_dir} -> gs://{bucket_name}/{target}/: {error.code} {detail}") from None
            raise _destination_error(error, bucket_name, target) from None
        finally:
            try:
                lock.release(claim)
            except Exception as error:  # noqa: BLE001  the version is whole: say so, do not fail the push
                log.warning("push: could not remove the lock %s/.kcp-lock (%s); delete it before the next push "
                            "of version %s", claim, " ".join(str(error).split())[:200], version)


def check_not_worse_than_served(bucket, prefix: str, served: int, version_dir: str, validation: dict,
                                max_regression: float) -> None:
    """Refuses a push that would put a worse model above the destination's highest version: one
    whose kcp validate test accuracy is more than `max_regression` below that version's, measured on
    the same data contract (kcp_fingerprint.json's contract_sha256, so the same test split). kcp
    validate makes that check within one run directory; a push from another run (a new `kcp run`
    for each retrain) is checked here. Versions of another contract, or without kcp's records
    (pushed by other tools), are not comparable and pass."""
    from google.api_core.exceptions import NotFound

    base = f"{prefix}/{served}" if prefix else str(served)
    try:
        theirs = json.loads(bucket.blob(f"{base}/assets.extra/validation.json").download_as_bytes())
        their_contract = json.loads(bucket.blob(f"{base}/assets.extra/{FINGERPRINT}").download_as_bytes())
        ours = storage.join(version_dir, "assets.extra", FINGERPRINT)
        our_contract = json.loads(storage.read_text(ours)) if storage.exists(ours) else {}
    except (ValueError, NotFound):  # no record there, or not kcp's: nothing to compare with
        return
    accuracy, served_accuracy = validation.get("export_accuracy"), theirs.get("export_accuracy")
    if not isinstance(accuracy, (int, float)) or not isinstance(served_accuracy, (int, float)) or \
            not theirs.get("blessed") or not our_contract.get("contract_sha256") or \
            our_contract.get("contract_sha256") != their_contract.get("contract_sha256"):
        return
    if accuracy < served_accuracy - max_regression:
        raise UserError(f"--to: gs://{bucket.name}/{base}/, the version a server there serves, scored test accuracy "
                        f"{served_accuracy:.4f} on the same data; this export scored {accuracy:.4f}, more than "
                        f"export.max_regression ({max_regression}) below, and would replace it; push a better "
                        "model, or --force to push it anyway")


_PUSHING: set = set()  # destination versions this process is pushing (the run lock counts re-entry per process)
_PUSHING_GUARD = threading.Lock()


@contextlib.contextmanager
def _in_this_process(claim: str, destination: str):
    """Two threads of one process (notebook code) pushing into one version: the second fails at once."""
    with _PUSHING_GUARD:
        if claim in _PUSHING:
            raise UserError(f"{destination}: another push in this process is writing it")
        _PUSHING.add(claim)
    try:
        yield
    finally:
        with _PUSHING_GUARD:
            _PUSHING.discard(claim)


def _destination_error(error, bucket_name: str, target: str) -> UserError:
    from google.api_core.exceptions import Forbidden, NotFound

    what = (f"not found; does bucket {bucket_name!r} exist?" if isinstance(error, NotFound)
            else "cannot be listed or written with these credentials" if isinstance(error, Forbidden) else "refused")
    detail = " ".join(str(getattr(error, "message", error)).split())[:200]
    return UserError(f"--to: gs://{bucket_name}/{target}/: {what} ({error.code} {detail})")


def _upload(client, bucket_name: str, target: str, version_dir: str, files: list[str]) -> list[str]:
    bucket = client.bucket(bucket_name)
    if bucket.blob(f"{target}/saved_model.pb").exists():
        raise UserError(f"gs://{bucket_name}/{target}/ already exists; versions are never overwritten "
                        "(push with --dest-version next to add one above)")
    # Without saved_model.pb the destination is absent or the remains of a killed push, which no
    # server loads: pushing again overwrites those files and completes it.
    files.sort(key=lambda relative: (relative == "saved_model.pb", relative))  # saved_model.pb last
    source_bucket = None
    if storage.is_remote(version_dir):
        source_bucket_name, source_prefix = storage.split_gs_uri(version_dir.rstrip("/"))
        source_bucket = client.bucket(source_bucket_name)
    written = []
    for relative in files:
        blob = bucket.blob(f"{target}/{relative}")
        storage.fault_point("before", f"gs://{bucket_name}/{blob.name}")
        if source_bucket is not None:
            source_bucket.copy_blob(source_bucket.blob(f"{source_prefix}/{relative}"), bucket, blob.name)
        else:
            blob.upload_from_filename(os.path.join(version_dir, *relative.split("/")))
        written.append(f"gs://{bucket_name}/{blob.name}")
    return written
