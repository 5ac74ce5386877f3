"""Copy a blessed export version to Cloud Storage with the google-cloud-storage client.

    kcp push --run-dir runs/digits --to gs://BUCKET/models/digits [--version N] [--force]

Files are uploaded under gs://BUCKET/models/digits/N/ with saved_model.pb last: TF Serving
only loads a version folder once saved_model.pb is there, so it never loads a half-copied
one. An existing destination version is never overwritten.
"""

from __future__ import annotations

import json
import os

from kcp.core.errors import UserError


def split_gs_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://") or len(uri) <= 5:
        raise UserError(f"--to: {uri!r} is not a gs://BUCKET/PATH URI")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def read_validation(version_dir: str) -> dict | None:
    path = os.path.join(version_dir, "assets.extra", "validation.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def push_export(version_dir: str, destination: str, force: bool = False, client=None) -> list[str]:
    """Uploads `version_dir` to DESTINATION/VERSION/; returns the gs:// URIs written."""
    from google.cloud import storage as gcs

    validation = read_validation(version_dir)
    if not force:
        if validation is None:
            raise UserError(f"{version_dir}: not validated; run `kcp validate` first (or push with --force)")
        if not validation.get("blessed"):
            raise UserError(f"{version_dir}: not blessed ({'; '.join(validation.get('reasons', []))}); "
                            "push with --force to push it anyway")
    bucket_name, prefix = split_gs_uri(destination)
    version = os.path.basename(os.path.normpath(version_dir))
    target = f"{prefix}/{version}" if prefix else version
    client = client or gcs.Client()
    bucket = client.bucket(bucket_name)
    if any(True for _ in client.list_blobs(bucket_name, prefix=f"{target}/", max_results=1)):
        raise UserError(f"gs://{bucket_name}/{target}/ already exists; versions are never overwritten")
    files = []
    for directory, _, names in os.walk(version_dir):
        for name in names:
            files.append(os.path.relpath(os.path.join(directory, name), version_dir))
    files.sort(key=lambda relative: (relative == "saved_model.pb", relative))  # saved_model.pb last
    written = []
    for relative in files:
        blob = bucket.blob(f"{target}/{relative.replace(os.sep, '/')}")
        blob.upload_from_filename(os.path.join(version_dir, relative))
        written.append(f"gs://{bucket_name}/{blob.name}")
    return written
