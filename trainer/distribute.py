"""Picks the `tf.distribute` strategy named by `train.strategy`.

    auto          multi_worker under a TF_CONFIG cluster of 2+ (kcp.core.cluster.effective_strategy,
                  applied by the trainer), else TPU when a TPU cluster resolves, else Mirrored over
                  2+ GPUs, else the default
    one_device    the first GPU, else the CPU
    mirrored      all local GPUs (or `train.cpu_devices` logical CPUs), synchronous all-reduce
    multi_worker  MultiWorkerMirroredStrategy from TF_CONFIG (see the README for an example)
    tpu           TPUStrategy; fails at once with a clear message when there is no TPU

TPU detection never hangs: the resolver is only asked when a TPU variable is set, and
`TPUClusterResolver()` with none set raises at once without a network call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import zlib

import numpy as np
import tensorflow as tf

from kcp.core.cluster import num_workers, training_task, worker_info
from kcp.core.errors import UserError
from trainer import compat

log = logging.getLogger("kcp.distribute")
TPU_VARIABLES = ("TPU_NAME", "KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS", "TPU_CONFIG")


def split_cpu(count: int) -> None:
    """Splits the physical CPU into `count` logical devices; must run before TF initialises devices."""
    if count <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != count:
            raise UserError(f"train.cpu_devices: TensorFlow already started with {existing} CPU device(s); "
                            f"set it before anything else runs") from None


def tpu_strategy():
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.NotFoundError) as error:
        raise UserError(f"train.strategy: 'tpu' but no TPU was found ({str(error).splitlines()[0]})") from None
    return tf.distribute.TPUStrategy(resolver)


def choose_strategy(name: str, cpu_devices: int = 0):
    """Returns the strategy for `train.strategy`; build and compile the model inside its scope."""
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise UserError("train.strategy: 'multi_worker' needs TF_CONFIG with the cluster and this task")
        training_task()
        if cpu_devices > 1:
            log.warning("train.cpu_devices=%d is not used under multi_worker: each worker is one replica on its "
                        "CPU (or all its GPUs)", cpu_devices)
        compat.patch_multi_worker_fit()
        kind, index, _ = worker_info()
        log.info("train: %s %d of a cluster of %d; waiting for every worker to start", kind, index, num_workers())
        on_sigterm = signal.getsignal(signal.SIGTERM)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # holds the GIL until every worker has come
        # TensorFlow's preemption notifier took SIGTERM over: it notes the signal and the worker trains
        # on, so `kill`, `timeout` or a pod's shutdown could not stop it. As a single process, it stops.
        with contextlib.suppress(ValueError):  # not the main thread: the signal is not ours to set
            signal.signal(signal.SIGTERM, signal.SIG_DFL if on_sigterm is None else on_sigterm)
        return strategy
    split_cpu(cpu_devices)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "tpu":
        return tpu_strategy()
    if name == "auto":
        if any(os.environ.get(variable) for variable in TPU_VARIABLES):
            return tpu_strategy()
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus)
    raise UserError(f"train.strategy: {name!r} is not supported")


PEER_FAILURE = ("Connection reset by peer", "unhealthy", "aborted by", "Connection refused", "Socket closed",
                "failed to connect", "Deadline Exceeded")


def peer_failure(error: Exception) -> str:
    """The line of a collective's error that says what became of the peer ("recvmsg:Connection reset by
    peer", "The following tasks are unhealthy ..."), not its first ("Graph execution error:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    told = [index for index, line in enumerate(lines) if any(word.lower() in line.lower() for word in PEER_FAILURE)]
    if not told:
        return (lines or [type(error).__name__])[0][:200]
    first = lines[told[0]]
    if first.endswith(":") and told[0] + 1 < len(lines):  # "The following tasks are unhealthy (...):" + the task
        first = f"{first} {lines[told[0] + 1]}"
    return first[:200]


@contextlib.contextmanager
def lost_peer_said(multi_worker: bool):
    """Under multi_worker, a peer that is gone (killed, preempted, out of memory) ends this worker's
    collectives with UnavailableError (or an aborted or cancelled collective): one line that says what
    to do, not TensorFlow's traceback. Other strategies' errors pass unchanged."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError) as error:
        if not multi_worker:
            raise
        raise UserError(f"train.strategy: multi_worker lost a peer ({type(error).__name__}: {peer_failure(error)}); run "
                        "every worker's command again: training resumes after the last epoch all of them backed "
                        "up") from None


def flat_settings(tree: dict, prefix: str = "") -> dict:
    """{"train.epochs": 8, ...}: a nested config dict with dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


SETTINGS_BYTES = 65536  # the most a worker's settings may take, compressed, to be named key by key
IGNORED_SETTINGS = ("tune.", "export.", "train.cpu_devices")  # not used by a multi_worker training


def check_workers_agree(strategy, settings: dict) -> None:
    """Under multi_worker, before training's first collective: every worker was given the same
    `settings` ({name: value}: the config's keys and the data contract), else one line on each
    worker naming the keys that differ and this worker's values. Workers started with different
    settings (one worker's `--set` changed between a kill and the rerun) otherwise fail deep in a
    collective ("Collective instance ... expected type 0 and data_type 1 but got ... data_type 9"),
    and the other worker says a peer was lost, which rerunning the same commands does not mend.

    Two all-gathers of fixed shapes, the same on every worker whatever its settings: a digest of
    them all and, only when the digests differ, each worker's settings themselves (compressed), so
    that each can name the keys, those of another model family's included."""
    settings = {name: value for name, value in settings.items() if not name.startswith(IGNORED_SETTINGS)}
    text = json.dumps(settings, sort_keys=True, default=str).encode()

    def gathered(values: np.ndarray) -> np.ndarray:
        row = tf.constant(values[None], tf.int32)
        return strategy.gather(strategy.run(tf.function(lambda: tf.identity(row))), axis=0).numpy()

    digests = gathered(np.frombuffer(hashlib.sha256(text).digest(), np.int32))
    if (digests == digests[0]).all():
        return
    packed = zlib.compress(text, 9)[:SETTINGS_BYTES]
    padded = np.zeros(SETTINGS_BYTES + 4, np.uint8)
    padded[:4] = np.frombuffer(np.int32(len(packed)).tobytes(), np.uint8)
    padded[4:4 + len(packed)] = np.frombuffer(packed, np.uint8)
    others = []
    for row in gathered(padded.view(np.int32)):
        raw = row.astype(np.int32).view(np.uint8)
        size = int(raw[:4].view(np.int32)[0])
        try:
            others.append(json.loads(zlib.decompress(raw[4:4 + size].tobytes())))
        except (zlib.error, ValueError):  # settings too large to be named
            others.append(None)
    mine = json.loads(text)  # as the others' came: tuples as lists, other values as text
    differ = sorted({name for other in others if other is not None for name in set(mine) | set(other)
                     if mine.get(name, "(not set)") != other.get(name, "(not set)")},
                    key=lambda name: (name != "model.name", name))  # another family: its keys follow
    here = ", ".join(f"{name}={mine.get(name, '(not set)')!r}" for name in differ[:4])
    raise UserError("train.strategy: multi_worker: the workers were started with different settings"
                    + (f": {', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''} (here {here})" if differ else "")
                    + "; start every worker with the same --config and --set, and run every worker's command again")
