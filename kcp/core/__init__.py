"""The foundation every stage stands on: config, storage, errors, the run-directory layout and
the data contract. It imports no stage (pipeline, trainer, tuning, deploy) and no front module
(the CLI, the Python API, the report); `make test` checks this with import-linter."""
