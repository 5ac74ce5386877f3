"""A TensorFlow Serving-compatible REST server for the SavedModels under RUN/export/.

    kcp serve --run-dir runs/digits --port 8501

    GET  /v1/models/NAME[/versions/N]            version status
    GET  /v1/models/NAME[/versions/N]/metadata   signatures
    POST /v1/models/NAME[/versions/N]:predict    {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME[/versions/N]:classify   {"examples": [...]}

Binary values are {"b64": "..."}. New version folders are picked up without a restart.
Concurrent requests to one signature are batched (`max_batch_size`, `batch_timeout_ms`).
Bad requests get 400 (or 404 for an unknown model or version, 413 for an oversized body)
with {"error": "..."}, as TF Serving answers; bad input never causes a 500. It binds
127.0.0.1 unless told otherwise. For production, the same SavedModels run unchanged in
TensorFlow Serving; this server is for local use, tests and small deployments.

Modules: `codec` (JSON <-> tensors, response bodies), `batching` (the Batcher),
`registry` (loads and hot-reloads RUN/export/NAME/VERSION), `rest` (HTTP handler and server).
"""

from deploy.serving.rest import make_server

__all__ = ["make_server"]
