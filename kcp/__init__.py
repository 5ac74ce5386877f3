"""keras-cloud-pipeline: raw data to a served Keras model, on a laptop or on cloud runners.

    import kcp
    run = kcp.Run("runs/nb")
    run.preprocess(source="digits"); run.train(overrides=["train.epochs=5"]); run.export()

The names of the Python API (kcp/api.py) load on first use: importing it brings TensorFlow,
Keras and Beam (about 8 s on 2 cores, measured), which `kcp --help` and code that only
needs the foundation (`kcp.core`) must not pay.
"""

__version__ = "0.1.0"

API = ("Run", "TrainResult", "TuneResult", "Report", "preprocess", "train", "tune", "export", "validate", "push",
       "predict", "report", "serve", "generate", "versions", "resolve_config", "new_run_dir", "newest_run")


def __getattr__(name: str):
    if name in API:
        from kcp import api

        return getattr(api, name)
    raise AttributeError(f"module 'kcp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
