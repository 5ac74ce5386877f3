"""A TensorFlow Serving-compatible server for the SavedModels under RUN/export/: REST and gRPC.

    kcp serve --run-dir runs/digits --port 8501 --grpc-port 8500

    GET  /v1/models/NAME[/versions/N|/labels/L]            version status
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata   signatures
    POST /v1/models/NAME[/versions/N|/labels/L]:predict    {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME[/versions/N|/labels/L]:classify   {"context": {...}, "examples": [...]}
    gRPC PredictionService (Predict, Classify, Regress, MultiInference, GetModelMetadata)
         and ModelService.GetModelStatus, with tensorflow-serving-api's protos

Binary values are {"b64": "..."}. Only versions `kcp validate` blessed are served unless
`allow_unvalidated`; TF Serving's version policies (latest:N, all, specific) and labels; new,
deleted and failed versions are handled by a background scan. Concurrent requests to one
signature are batched. Errors are answered as TF Serving answers them (docs/serving.md has
the table); bad input never causes a 500, and hostile clients meet size, depth, time and
connection limits. It binds 127.0.0.1 unless told otherwise. For production, the same
SavedModels run unchanged in TensorFlow Serving.

Modules: `codec` (JSON <-> tensors, response bodies), `batching` (the Batcher), `versions`
(policy, labels, blessing, warmup), `registry` (loads, unloads and rescans RUN/export/NAME/VERSION),
`routes` (the REST routes), `rest` (the HTTP layer, on aiohttp), `grpc` (the gRPC services).
"""

from deploy.serving.rest import make_server

__all__ = ["make_server"]
