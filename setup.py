"""keras-cloud-pipeline: raw data to a served Keras model, on a laptop first and on cloud runners after.

Kept as setup.py beside the packages so Dataflow (`--setup_file ./setup.py`) and Vertex AI
workers install exactly this code. Exact versions live in constraints.txt.
"""

from setuptools import find_packages, setup

setup(
    name="keras-cloud-pipeline",
    version="0.1.0",
    description="Apache Beam preprocessing, Keras 3 training and tuning, SavedModel serving, one run directory.",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["kcp", "kcp.*", "pipeline", "pipeline.*", "trainer", "trainer.*",
                                    "tuning", "tuning.*", "deploy", "deploy.*"]),
    install_requires=[
        # `tensorflow`, not `tensorflow-cpu`: see constraints.txt. The wheel runs on CPU.
        "tensorflow>=2.16,<2.22",
        "keras>=3.5,<4",
        "tensorboard>=2.16",  # TF 2.21 no longer requires it; the trainer's TensorBoard callback does
        "tensorflow-serving-api>=2.16,<2.22",  # PredictionLog protos for the export's warmup requests
        "google-cloud-storage>=2",  # kcp push
        "aiohttp>=3.14,<4",  # kcp serve's REST server (relies on its keep-alive timer from connection start)
        "tensorflow-datasets>=4.9",  # the tfds: source
        "keras-tuner[bayesian]>=1.4",  # kcp tune (the bayesian extra brings scipy and scikit-learn)
        "apache-beam>=2.60,<3",
        "google-crc32c>=1.5",  # Beam's TFRecord framing needs a CRC32C; [gcp] brings it, the core did not
        "numpy>=1.26",
        # Beam builds a pipeline through its interactive runner when it runs inside IPython
        # (Jupyter, Colab), and that imports pandas; the bound is Beam's own ([interactive])
        "pandas>=1.4.3,<2.4,!=1.5.0,!=1.5.1",
        "pillow>=10",  # decoding image folders
        "matplotlib>=3.7",  # samples.png and the run report
        "pyyaml>=6",
        "scikit-learn>=1.3",  # the embedded default data set (digits)
        # data.tokenizer bpe (language): the exported graph tokenizes with keras_hub's BytePairTokenizer
        # (TensorFlow Text ops); kcp/core/bpe.py mirrors its split in pure Python for the pipeline,
        # so keras-hub is held to the minor it was checked against (constraints.txt)
        "keras-hub>=0.32,<0.33",
        "tensorflow-text>=2.16,<2.22",
        "regex>=2023",
    ],
    extras_require={
        # import-linter checks the layering rule (.importlinter); nbclient + ipykernel run the notebook;
        # pytest-xdist runs `make test` on two processes (Makefile TEST_WORKERS)
        "test": ["pytest>=8", "pytest-timeout>=2", "pytest-xdist>=3.5", "gcp-storage-emulator>=2024", "import-linter>=2.1",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
        "jax": ["jax>=0.4.30"],
        "gpu": ["tensorflow[and-cuda]>=2.16,<2.22"],
        # TPU VMs bring their own tensorflow-tpu and libtpu in the VM image (there is no
        # tensorflow-tpu 2.21 wheel, and installing it beside `tensorflow` would put two
        # distributions into one folder); TPUStrategy itself is part of core TensorFlow.
        "tpu": [],
        "gcp": ["apache-beam[gcp]>=2.60,<3", "google-cloud-storage>=2"],
        "dask": ["apache-beam[dask]>=2.60,<3"],
    },
    entry_points={"console_scripts": ["kcp=kcp.cli:main"]},
)
