"""Remote storage backends: Beam's FileSystems (gs:// through the google-cloud-storage client,
which honours STORAGE_EMULATOR_HOST) and tf.io.gfile for the schemes Beam has no filesystem
for, plus the google-cloud-storage client for what FileSystems cannot say (preconditions).
"""

from __future__ import annotations

import os
import posixpath

from kcp.core.backends import Backend, _temporary

OBJECT_STORES = ("gs", "s3", "azfs")  # an upload appears whole, or not at all


def _scheme(path: str) -> str:
    return str(path).split("://", 1)[0]


_GCS_CLIENTS: dict = {}  # by STORAGE_EMULATOR_HOST (None: the real service)


def gcs_client():
    """A google-cloud-storage client, for what Beam's FileSystems cannot say (preconditions)."""
    from google.cloud import storage as gcs

    key = os.environ.get("STORAGE_EMULATOR_HOST")
    if key not in _GCS_CLIENTS:
        _GCS_CLIENTS[key] = gcs.Client()
    return _GCS_CLIENTS[key]


def split_gs_uri(uri: str) -> tuple[str, str]:
    """gs://BUCKET/NAME -> (BUCKET, NAME)."""
    bucket, _, name = str(uri)[len("gs://"):].partition("/")
    return bucket, name


def _gcs_blob(path: str):
    bucket, name = split_gs_uri(path)
    return gcs_client().bucket(bucket).blob(name)


def gcs_rename_no_overwrite(source: str, target: str) -> None:
    """Moves a gs:// object onto a name that must not exist: the server-side copy carries
    ifGenerationMatch=0, so GCS itself refuses it (FileExistsError here) when the target exists,
    even if it appeared a moment ago; only then is the source deleted. Within one bucket the copy
    is a one-source compose (its precondition is on the destination, as in every GCS request)."""
    from google.api_core.exceptions import PreconditionFailed

    source_blob, target_blob = _gcs_blob(source), _gcs_blob(target)
    try:
        if source_blob.bucket.name == target_blob.bucket.name:
            source_blob.reload()
            target_blob.content_type = source_blob.content_type
            target_blob.compose([source_blob], if_generation_match=0)
        else:
            source_blob.bucket.copy_blob(source_blob, target_blob.bucket, target_blob.name, if_generation_match=0)
    except PreconditionFailed:
        raise FileExistsError(f"{target} exists") from None
    source_blob.delete()


def anonymous_beam_gcs() -> None:
    """Against a local GCS emulator (STORAGE_EMULATOR_HOST), Beam's gcsio goes without credentials
    at once: it would look for Google's credentials first, retrying for about 20 s with a traceback
    each time, before falling back to the anonymous client the emulator accepts. Beam has no public
    switch for this (`--no_auth` is not read by gcsio), so its credentials cache is set as resolved
    to none (Beam 2.x's `_Credentials`; without that attribute, Beam's own lookup runs as before)."""
    try:
        from apache_beam.internal.gcp import auth
    except ImportError:  # Beam without its GCP extra: no gcsio either
        return
    credentials = getattr(auth, "_Credentials", None)
    if credentials is not None and hasattr(credentials, "_credentials_init"):
        with credentials._credentials_lock:
            credentials._credentials_init, credentials._credentials = True, None


_CREDENTIALS_FOUND: set = set()  # GOOGLE_APPLICATION_CREDENTIALS values google.auth found credentials with


def check_write_credentials(paths) -> None:
    """One line (UserError) at once when one of `paths` is on gs:// and no Google Cloud credentials
    are found, where Beam's gcsio would go on anonymously and retry for two minutes before failing
    (measured: `kcp predict --output gs://…`, 2 min 18 s). These are paths a command writes to
    (the run directory, predict's --output, push's --to): an anonymous client may read a public
    bucket, never write. Against a GCS emulator (STORAGE_EMULATOR_HOST) no credentials are needed."""
    remote = [str(path) for path in paths if path and _scheme(str(path)) == "gs"]
    if not remote or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError:  # no GCP extra: the storage layer says so
        return
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key in _CREDENTIALS_FOUND:  # found once: not looked up again (a failure is: a notebook may log in since)
        return
    try:
        google.auth.default()
        _CREDENTIALS_FOUND.add(key)
    except DefaultCredentialsError as error:
        from kcp.core.errors import UserError

        problem = str(error).strip().splitlines()[0] if str(error).strip() else ""
        shown = f" ({problem.split(' To set up')[0].rstrip('.')})" if problem else ""
        raise UserError(f"{remote[0]}: no Google Cloud credentials to write there{shown}; run `gcloud auth "
                        "application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account's "
                        "key file") from None


class BeamBackend(Backend):
    """Beam's FileSystems. In its globs `*` stops at "/" and `**` does not."""

    def __init__(self):
        # Lazy: reading a local YAML must not import Beam (measured: ~1.5 s per process).
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        self.fs, self.raw = FileSystems, CompressionTypes.UNCOMPRESSED
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            anonymous_beam_gcs()

    def _under(self, path: str) -> list[str]:
        """Every object below the "folder" `path`."""
        return [metadata.path for metadata in self.fs.match([path.rstrip("/") + "/**"])[0].metadata_list]

    def exists(self, path):
        return self.fs.exists(path) or bool(self._under(path))

    def makedirs(self, path):
        pass  # object stores need no folders

    def read_bytes(self, path):
        with self.fs.open(path, compression_type=self.raw) as handle:  # the bytes, never unpacked by name (.gz)
            return handle.read()

    def write_bytes_atomic(self, path, content):
        # An object store publishes an upload whole when it completes (readers see the old
        # object until then), so the target is written directly: no temporary, and above all no
        # delete of the old object first (a kill after such a delete would lose the file).
        if _scheme(path) in OBJECT_STORES:
            with self.fs.create(path, compression_type=self.raw) as handle:
                handle.write(content)
            return
        temporary = _temporary(path)
        with self.fs.create(temporary, compression_type=self.raw) as handle:
            handle.write(content)
        self.fs.rename([temporary], [path])

    def create_exclusive(self, path, content):
        if _scheme(path) != "gs":
            return super().create_exclusive(path, content)
        from google.api_core.exceptions import PreconditionFailed

        try:
            _gcs_blob(path).upload_from_string(content, if_generation_match=0)
        except PreconditionFailed:
            return False
        return True

    def remove_if_content(self, path, content):
        if _scheme(path) != "gs":
            return super().remove_if_content(path, content)
        from google.api_core.exceptions import NotFound, PreconditionFailed

        blob = _gcs_blob(path)
        try:
            blob.reload()
            if blob.download_as_bytes(if_generation_match=blob.generation) != content:
                return False
            blob.delete(if_generation_match=blob.generation)
        except (NotFound, PreconditionFailed):
            return False
        return True

    def glob(self, pattern):
        return sorted(metadata.path for metadata in self.fs.match([pattern])[0].metadata_list)

    def remove(self, path):
        if self.fs.exists(path):
            self.fs.delete([path])

    def remove_tree(self, path):
        paths = self._under(path)
        if paths:
            self.fs.delete(paths)

    def list_dir(self, path):
        prefix = path.rstrip("/") + "/"
        names = {child[len(prefix):].split("/", 1)[0] for child in self._under(path)}
        return sorted(name for name in names if name)

    def list_files(self, path):
        prefix = path.rstrip("/") + "/"
        return sorted(child[len(prefix):] for child in self._under(path) if not child.endswith("/"))

    def rename(self, source, target, overwrite=True):
        if not overwrite and _scheme(target) == "gs":
            return gcs_rename_no_overwrite(source, target)
        if not overwrite and self.fs.exists(target):  # other schemes: no precondition to say it atomically
            raise FileExistsError(f"{target} exists")
        self.fs.rename([source], [target])  # on gs://, a copy (which replaces the target) and a delete


class GfileBackend(Backend):
    """`tf.io.gfile`, for the schemes Beam has no filesystem for."""

    def __init__(self):
        # Lazy: reading a local YAML must not import TensorFlow (measured: ~5-7 s per process).
        import tensorflow as tf

        self.gfile = tf.io.gfile
        self.already_exists = tf.errors.AlreadyExistsError

    def exists(self, path):
        return self.gfile.exists(path)

    def makedirs(self, path):
        self.gfile.makedirs(path)

    def read_bytes(self, path):
        with self.gfile.GFile(path, "rb") as handle:
            return handle.read()

    def write_bytes_atomic(self, path, content):
        temporary = _temporary(path)
        with self.gfile.GFile(temporary, "wb") as handle:
            handle.write(content)
        self.gfile.rename(temporary, path, overwrite=True)

    def glob(self, pattern):
        return sorted(self.gfile.glob(pattern))

    def remove(self, path):
        if self.gfile.exists(path):
            self.gfile.remove(path)

    def remove_tree(self, path):
        if self.gfile.exists(path):
            self.gfile.rmtree(path)

    def list_dir(self, path):
        return sorted(name.rstrip("/") for name in self.gfile.listdir(path)) if self.gfile.exists(path) else []

    def list_files(self, path):
        root = path.rstrip("/")
        return sorted(posixpath.join(directory, name)[len(root) + 1:]
                      for directory, _, names in self.gfile.walk(root) for name in names)

    def rename(self, source, target, overwrite=True):
        if not overwrite and _scheme(target) == "gs" and _has_gcs_client():
            return gcs_rename_no_overwrite(source, target)
        try:  # without overwrite, gfile checks that the target is absent first (not atomically)
            self.gfile.rename(source, target, overwrite=overwrite)
        except self.already_exists:
            raise FileExistsError(f"{target} exists") from None


def _has_gcs_client() -> bool:
    """Whether google-cloud-storage is installed (the `gcp` extra), for preconditions on gs://."""
    import importlib.util

    try:
        return importlib.util.find_spec("google.cloud.storage") is not None
    except ModuleNotFoundError:  # no google.cloud at all
        return False


STORAGE_ERROR_MODULES = ("google.api_core.", "google.auth.", "google.cloud.storage.", "google.resumable_media.")


def storage_failure(error: BaseException) -> str | None:
    """One line for a failure of a Google Cloud service (storage, Dataflow) or of reaching it (refused
    credentials, no network, a server error), found in `error` or what it was raised from (`raise ...
    from`, not an error met while handling one); None for any other error. The line is the client's
    own first line (it names the object or the host), cut at a word after 400 characters."""
    seen = 0
    while error is not None and seen < 8:
        name = type(error).__module__ + "."
        if name.startswith(STORAGE_ERROR_MODULES) or type(error).__name__ == "BeamIOError":
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            first = first if len(first) <= 400 else first[:400].rsplit(" ", 1)[0] + " …"
            return f"{'Google Cloud' if name.startswith('google.') else 'remote storage'}: {first}"
        error, seen = error.__cause__, seen + 1
    return None
