"""Copy a blessed export version to Cloud Storage with the google-cloud-storage client.

    kcp push --run-dir runs/digits --to gs://BUCKET/models/digits [--version N] [--force]

Files are uploaded under gs://BUCKET/models/digits/N/ with saved_model.pb last: TF Serving
only loads a version folder once saved_model.pb is there, so it never loads a half-copied
one. A complete destination version (saved_model.pb present) is never overwritten; an
incomplete one, left by a push that was killed halfway, is completed by pushing again. Two pushes
to the same destination version at once cannot mix their files: each holds the destination's
lock (DESTINATION/VERSION/.kcp-lock, kcp/core/lock.py, created with ifGenerationMatch=0) while it
uploads, and the second one fails at once naming the first. The run directory may be local or on
gs:// (then the files are copied within Cloud Storage).
"""

from __future__ import annotations

import json
import os

from kcp.core import storage
from kcp.core.errors import UserError
from kcp.core.layout import validation_record
from kcp.core.lock import run_lock


def split_gs_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://") or len(uri) <= 5:
        raise UserError(f"--to: {uri!r} is not a gs://BUCKET/PATH URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


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


def push_export(version_dir: str, destination: str, force: bool = False, client=None) -> list[str]:
    """Uploads `version_dir` (local or gs://) to DESTINATION/VERSION/; returns the gs:// URIs written."""
    from google.api_core.exceptions import Forbidden, NotFound
    from google.cloud import storage as gcs

    validation = read_validation(version_dir)
    if not force:
        if validation is None:
            raise UserError(f"{version_dir}: not validated; run `kcp validate` first (or push with --force)")
        if not validation.get("blessed"):
            raise UserError(f"{version_dir}: not blessed ({'; '.join(validation.get('reasons', []))}); "
                            "push with --force to push it anyway")
    bucket_name, prefix = split_gs_uri(destination)
    version = version_dir.rstrip("/").replace(os.sep, "/").rsplit("/", 1)[-1]
    target = f"{prefix}/{version}" if prefix else version
    files = storage.list_files(version_dir)
    if "saved_model.pb" not in files:
        raise UserError(f"{version_dir}: no saved_model.pb; not a complete export version")
    client = client or gcs.Client()
    try:
        with run_lock(f"gs://{bucket_name}/{target}", "push"):  # one push at a time into this version
            return _upload(client, bucket_name, target, version_dir, files)
    except (NotFound, Forbidden) as error:  # a missing bucket, or credentials that may not write there
        what = (f"not found; does bucket {bucket_name!r} exist?" if isinstance(error, NotFound)
                else "cannot be written with these credentials")
        detail = " ".join(str(getattr(error, "message", error)).split())[:200]
        raise UserError(f"--to: gs://{bucket_name}/{target}/: {what} ({error.code} {detail})") from None


def _upload(client, bucket_name: str, target: str, version_dir: str, files: list[str]) -> list[str]:
    bucket = client.bucket(bucket_name)
    if bucket.blob(f"{target}/saved_model.pb").exists():
        raise UserError(f"gs://{bucket_name}/{target}/ already exists; versions are never overwritten")
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
