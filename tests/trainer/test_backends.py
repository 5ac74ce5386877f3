"""Every family builds and trains under the JAX backend, without TensorFlow (as on the GPU machine)."""

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
import numpy as np
import keras
from kcp.core.config_load import load_config
from trainer.models import ModelInputs, build_model, families_for

specs = {
    "image": ModelInputs("image", (8, 8, 1), 4, mean=(0.0,), std=(1.0,)),
    "sequence": ModelInputs("sequence", (12, 3), 4, input_name="sequence"),
    "text": ModelInputs("text", (10,), 4, vocab_size=30, input_name="text", char_ngram_length=8,
                        char_ngram_buckets=50),  # 10 token ids, then 8 character n-gram ids
    "language": ModelInputs("language", (10,), 30, vocab_size=30, input_name="tokens"),
}
small = {"cnn": ["model.filters=[8]"], "resnet": ["model.depth=8", "model.width=8"],
         "rnn": ["model.units=16", "model.bidirectional=true"], "transformer": ["model.dim=16", "model.heads=2", "model.mlp_dim=32"],
         "gpt": ["model.layers=1", "model.dim=16", "model.heads=2"]}
rng = np.random.default_rng(0)
results = []
for modality, spec in specs.items():
    for family in families_for(modality):
        config = load_config([], [f"model.name={family}", "model.dropout=0.0", *small[family]]).model
        model = build_model(spec, config)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=modality == "language")
        model.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
        if modality == "language":  # next-token targets of one fixed batch
            tokens = rng.integers(3, 30, size=(32, 11)).astype("int32")
            x, y = tokens[:, :-1], tokens[:, 1:]
        elif modality == "text":
            x = np.concatenate([rng.integers(0, 30, size=(32, 10)), rng.integers(0, 50, size=(32, 8))], axis=1)
            x = x.astype("int32")
            y = rng.integers(0, 4, size=32)
        else:
            x = rng.normal(size=(32, *spec.shape)).astype("float32")
            y = rng.integers(0, 4, size=32)
        history = model.fit(x, y, epochs=15, batch_size=32, verbose=0)  # one fixed batch: loss must fall
        losses = history.history["loss"]
        results.append({"family": family, "modality": modality, "first": losses[0], "last": losses[-1]})
print(json.dumps({"backend": keras.backend.backend(), "tensorflow_imported": "tensorflow" in sys.modules,
                  "results": results}))
"""


def test_every_family_trains_under_jax_without_tensorflow():
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax"
    assert report["tensorflow_imported"] is False
    assert len(report["results"]) == 13  # 4 classifier families x 3 modalities, gpt on language
    for result in report["results"]:
        assert result["last"] < result["first"], result  # it learned something
