"""gs:// sources and run directories against a local GCS emulator, through the real clients."""

import io
import json

import numpy as np
import tensorflow as tf
from PIL import Image

from kcp.core import storage
from kcp.core.config_load import load_config
from kcp.core import contract as contract_lib
from pipeline.preprocess import run_preprocess
from tests.conftest import IN_PROCESS_BEAM


def test_image_folder_round_trip_through_gcs(gcs, tmp_path):
    bucket = gcs.bucket("kcp-test")
    rng = np.random.default_rng(0)
    for index in range(40):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).save(buffer, format="PNG")
        bucket.blob(f"images/{'ab'[index % 2]}/{index:03d}.png").upload_from_string(buffer.getvalue())
    bucket.blob("images/a/broken.png").upload_from_string(b"not an image")

    run_dir = "gs://kcp-test/runs/r1"
    config = load_config([], ["data.source=folder:gs://kcp-test/images", "data.max_bad_fraction=0.1",
                              "data.augment.copies=1"])
    contract = run_preprocess(config, run_dir, IN_PROCESS_BEAM)

    names = sorted(blob.name for blob in gcs.list_blobs("kcp-test", prefix="runs/r1/"))
    assert "runs/r1/data/metadata.json" in names and "runs/r1/data/samples.png" in names
    assert not [name for name in names if ".tmp-" in name or ".summary-" in name]
    metadata = json.loads(bucket.blob("runs/r1/data/metadata.json").download_as_bytes())
    assert metadata["bad_examples"] == 1 and metadata["class_names"] == ["a", "b"]
    assert contract_lib.read_contract(run_dir) == contract
    dead = [name for name in names if name.startswith("runs/r1/data/dead_letter/")]
    assert len(dead) == 1 and "a/broken.png" in bucket.blob(dead[0]).download_as_text()

    total = 0
    for split, info in contract.splits.items():
        for path in storage.glob(f"{run_dir}/data/{info.file_pattern}"):
            local = tmp_path / path.rsplit("/", 1)[1]
            local.write_bytes(storage.read_bytes(path))
            total += sum(1 for _ in tf.data.TFRecordDataset(str(local)))
    assert total == sum(info.count for info in contract.splits.values()) == 40 + contract.splits["train"].count // 2
