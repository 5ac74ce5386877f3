"""keras-cloud-pipeline: raw data to a served Keras model, on a laptop or on cloud runners."""

__version__ = "0.1.0"
