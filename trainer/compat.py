"""Work-arounds for upstream bugs: each one small, version-guarded, linked, and tested to fail without it."""

from __future__ import annotations

import logging

log = logging.getLogger("kcp.compat")
_PATCHED = set()

# keras-team/keras#20585: `model.fit` under MultiWorkerMirroredStrategy fails with
# "ValueError: Attempt to convert a value (PerReplica…)". Seen in Keras 3.x up to 3.15.1;
# re-check when raising the pin in constraints.txt.
KERAS_20585_AFFECTED = ((3, 0), (3, 16))  # [first affected, first release to re-check)


def _keras_version() -> tuple:
    import keras

    return tuple(int(part) for part in keras.__version__.split(".")[:2])


def _needs_a_batch(model) -> bool:
    """Whether Keras' `_symbolic_build` would read a batch: the model, its compiled metrics or loss unbuilt."""
    metrics, loss = model._compile_metrics, model._compile_loss  # noqa: SLF001  Keras' own conditions
    return (not all(layer.built for layer in model._flatten_layers())  # noqa: SLF001
            or (metrics is not None and not metrics.built) or (loss is not None and not loss.built))


def patch_multi_worker_fit() -> bool:
    """Applies the two-part fix for keras#20585; returns True if it patched now or before.

    1. `_maybe_symbolic_build` reduces the first distributed batch with `strategy.reduce`,
       which multi-worker strategies refuse for per-replica batches; the build only needs
       shapes, so take the first local replica's batch instead.
       Once built (evaluate after fit) it takes no batch at all.
    2. `reduce_per_replica` reduces multi-worker means with `axis=0`, which fails on the
       scalar metric values; reduce them with `axis=None`.
    """
    if "keras-20585" in _PATCHED:
        return True
    low, high = KERAS_20585_AFFECTED
    if not low <= _keras_version() < high:
        log.warning("keras %s is outside the range known to need the keras#20585 fix; not patching",
                    ".".join(map(str, _keras_version())))
        return False
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None and not _needs_a_batch(self):
            iterator = None  # built already (evaluate after fit): no batch taken, which would leave a cached
            # dataset read in part, thrown away by tf.data with a warning on every worker
        if iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                distributed = tree.map_structure(lambda v: isinstance(v, tf.distribute.DistributedValues), batch)
                if all(tree.flatten(distributed)):
                    batch = tree.map_structure(lambda v: self.distribute_strategy.experimental_local_results(v)[0],
                                               batch)
                data_batch = batch
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    original_reduce = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _PATCHED.add("keras-20585")
    return True
