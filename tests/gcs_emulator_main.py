"""gcp-storage-emulator's command line, with the generation preconditions real GCS enforces.

gcp-storage-emulator 2026.7.19 ignores `ifGenerationMatch`; kcp relies on it (run-directory
locks and export version claims are created with `ifGenerationMatch=0`, stale locks deleted
with the generation that was read). This wrapper checks the precondition of every object
request that carries one, under one lock, and answers 412 as GCS does when it fails; it is
run as `python tests/gcs_emulator_main.py start ...` by tests/gcs.py.
"""

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound

_LOCK = threading.Lock()
_original_handle = server.Router.handle
_original_request_init = server.Request.__init__


def _request_init(self, request_handler, method):
    _original_request_init(self, request_handler, method)
    prefetched = getattr(request_handler, "_kcp_prefetched", server._UNSET)
    if prefetched is not server._UNSET:  # the body was read for the precondition check
        self._data = prefetched


server.Request.__init__ = _request_init


def _current_generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name).get("generation") or "0")
    except NotFound:
        return "0"  # GCS: ifGenerationMatch=0 means "only if absent"


def _target(request):
    """(bucket, object name) the request is about, or None."""
    params = request.params
    if params.get("dest_bucket_name") and params.get("dest_object_id"):  # copyTo/rewriteTo: about the target
        return params["dest_bucket_name"], params["dest_object_id"]
    bucket = params.get("bucket_name")
    if not bucket:
        return None
    if params.get("object_id"):
        return bucket, params["object_id"]
    if request.query.get("name"):
        return bucket, request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
        if meta.get("name"):
            return bucket, meta["name"]
    return None


def handle(self, method):
    override = self._request_handler.headers.get("x-http-method-override") or method
    request = server.Request(self._request_handler, override)
    wanted = request.query.get("ifGenerationMatch")
    if not wanted or "upload_id" in request.query:
        return _original_handle(self, method)
    with _LOCK:
        for regex, _ in server.HANDLERS:
            match = server.re.compile(regex).fullmatch(request.path)
            if match:
                request.set_match(match)
                break
        try:
            target = _target(request)
        finally:
            if request._data is not server._UNSET:
                self._request_handler._kcp_prefetched = request._data
        if target and _current_generation(self._request_handler.storage, *target) != str(wanted[0]):
            response = server.Response(self._request_handler)
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified "
                                                             "did not hold."}})
            response.close()
            return
        return _original_handle(self, method)


server.Router.handle = handle

if __name__ == "__main__":
    main(sys.argv[1:])
