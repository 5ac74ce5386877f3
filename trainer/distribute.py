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
import logging
import os

import tensorflow as tf

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
        compat.patch_multi_worker_fit()
        return tf.distribute.MultiWorkerMirroredStrategy()
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
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise UserError(f"train.strategy: multi_worker lost a peer ({type(error).__name__}: {first[:200]}); run "
                        "every worker's command again: training resumes after the last epoch all of them backed "
                        "up") from None
