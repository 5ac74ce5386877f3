"""Copy a blessed export version to Cloud Storage with the google-cloud-storage client.

    kcp push --run-dir runs/digits --to gs://BUCKET/models/digits [--version N] [--force]

Files are uploaded under gs://BUCKET/models/digits/N/ with saved_model.pb last: TF Serving
only loads a version folder once saved_model.pb is there, so it never loads a half-copied
one. A complete destination version (saved_model.pb present) is never overwritten; an
incomplete one, left by a push that was killed halfway, is completed by pushing again. The run
directory may be local or on gs:// (then the files are copied within Cloud Storage).
"""

from __future__ import annotations

import json
import os

from kcp.core import storage
from kcp.core.errors import UserError


def split_gs_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://") or len(uri) <= 5:
        raise UserError(f"--to: {uri!r} is not a gs://BUCKET/PATH URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def read_validation(version_dir: str) -> dict | None:
    path = storage.join(version_dir, "assets.extra", "validation.json")
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def push_export(version_dir: str, destination: str, force: bool = False, client=None) -> list[str]:
    """Uploads `version_dir` (local or gs://) to DESTINATION/VERSION/; returns the gs:// URIs written."""
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
