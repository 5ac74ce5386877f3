"""Preprocessing: an Apache Beam job from raw sources to sharded TFRecords and metadata.json."""
