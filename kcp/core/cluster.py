"""The process's place in a distributed job, from TF_CONFIG (multi-worker training, Vertex AI)
and Keras Tuner's variables: plain JSON and environment reading, no TensorFlow."""

from __future__ import annotations

import json
import os
import socket

from kcp.core.errors import UserError

TUNER_VARIABLES = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")  # a distributed search sets all


def tf_config() -> dict:
    """TF_CONFIG, checked: one line (UserError) for text that is not JSON, a cluster that is not lists
    of addresses, or a task missing (in a cluster of two or more) or not in the cluster, where
    TensorFlow and Keras Tuner would end in a traceback or run the task as another."""
    raw = os.environ.get("TF_CONFIG") or "{}"
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UserError(f"TF_CONFIG: not JSON ({error.msg} at character {error.pos}): {raw[:80]!r}") from None
    cluster = config.get("cluster") or {} if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not all(isinstance(hosts, list) for hosts in cluster.values()):
        raise UserError('TF_CONFIG: expected {"cluster": {"chief": ["HOST:PORT"], "worker": [...]}, "task": '
                        f'{{"type": "worker", "index": 0}}}}, got {raw[:80]!r}')
    task = config.get("task")
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if task is None and workers >= 2:
        raise UserError(f"TF_CONFIG: a cluster of {workers} workers but no 'task': give each replica its own "
                        '{"type": ..., "index": ...}')
    if task is not None:
        kind, index = (task.get("type"), task.get("index", 0)) if isinstance(task, dict) else (None, None)
        if kind != "evaluator" and (  # TensorFlow's evaluator task is not in the cluster
                kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind])):
            raise UserError(f"TF_CONFIG: task {json.dumps(task)} is not in the cluster "
                            f"({', '.join(f'{k}: {len(v)}' for k, v in cluster.items()) or 'empty'})")
    return config


def training_task() -> None:
    """A multi_worker replica's TF_CONFIG task is a "chief" or a "worker": an "evaluator" (or a
    parameter server) is one line, where TensorFlow would end in a KeyError or the task would
    train a model of its own."""
    kind = worker_info()[0]
    if kind not in ("chief", "worker"):
        raise UserError(f"TF_CONFIG: task type {kind!r} does not train: multi_worker training runs 'chief' and "
                        "'worker' tasks (kcp evaluates every split itself after fit); start this task as one of "
                        "them, or not at all")


def worker_info() -> tuple[str, int, bool]:
    """(task type, task index, is chief) from TF_CONFIG; ('worker', 0, True) without one."""
    config = tf_config()
    task = config.get("task", {})
    task_type, index = task.get("type", "worker"), int(task.get("index", 0))
    cluster = config.get("cluster", {})
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)
    return task_type, index, chief


def num_workers() -> int:
    """Workers (chief included) in TF_CONFIG's cluster; 1 without one."""
    cluster = tf_config().get("cluster", {})
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def effective_strategy(name: str) -> str:
    """`train.strategy` as it runs: `auto` under a TF_CONFIG cluster of two or more workers (a Vertex
    AI job with several replicas) is `multi_worker`, so that the replicas train one model together
    rather than each its own into the same run directory."""
    return "multi_worker" if name == "auto" and num_workers() >= 2 else name


def tuner_id() -> str:
    """This process's Keras Tuner id (KERASTUNER_TUNER_ID): "" outside a distributed search."""
    return os.environ.get("KERASTUNER_TUNER_ID", "")


def is_tuner_worker() -> bool:
    """A worker of a distributed search: any tuner id without "chief", as Keras Tuner reads it
    (kcp's `worker-<host>-<pid>`, Keras Tuner's own `tuner0`, or whatever a launcher sets)."""
    return bool(tuner_id()) and "chief" not in tuner_id()


def is_cluster_helper(strategy: str | None = None) -> bool:
    """True in the processes of a distributed job that work for another one: Keras Tuner workers,
    and the training replicas of a multi_worker `strategy` (`train.strategy`, auto included)
    other than the chief (or worker 0 when there is no chief). A process that TF_CONFIG names as
    a worker but that trains alone (another strategy), or runs another command, works for no one."""
    if is_tuner_worker():
        return True
    return strategy is not None and effective_strategy(strategy) == "multi_worker" and not worker_info()[2]


def take_tuner_role(role: str | None, oracle: str | None, worker_id: str | None) -> None:
    """`kcp tune --role chief|worker --oracle HOST:PORT [--tuner-id ID]` as Keras Tuner's variables
    (KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT); a bad address or id is one line.

    With no --role and no KERASTUNER_TUNER_ID, a TF_CONFIG naming a cluster of two or more (a Vertex
    AI custom job: its first pool the chief, the others workers) sets them: the chief task (worker 0
    when there is none) serves the oracle on its TF_CONFIG address, every other task is a worker
    named TYPE-INDEX. TF_CONFIG is then dropped from this process: each trial trains on one machine."""
    if not role:
        if oracle or worker_id:
            raise UserError(f"--{'oracle' if oracle else 'tuner-id'}: give --role chief or --role worker with it "
                            "(without a role the search runs alone)")
        given = [name for name in TUNER_VARIABLES if os.environ.get(name)]
        if given and len(given) < 3:  # Keras Tuner's RuntimeError, after the search has begun writing
            missing = sorted(set(TUNER_VARIABLES) - set(given))
            raise UserError(f"{', '.join(given)} set without {', '.join(missing)}: a distributed search needs all "
                            "three (or --role and --oracle)")
        if given:
            port = os.environ["KERASTUNER_ORACLE_PORT"]
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(f"KERASTUNER_ORACLE_PORT: {port!r} is not a port number (1 to 65535)")
            return
        if num_workers() < 2:
            return
        cluster = tf_config()["cluster"]
        task_type, index, chief = worker_info()
        take_tuner_role("chief" if chief else "worker", (cluster.get("chief") or cluster["worker"])[0],
                        None if chief else f"{task_type}-{index}")
        del os.environ["TF_CONFIG"]
        return
    if not oracle or ":" not in oracle:
        raise UserError("--oracle: a distributed search needs the chief's HOST:PORT")
    host, port = oracle.rsplit(":", 1)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--oracle: {oracle!r} has no port number (HOST:PORT, a port from 1 to 65535)")
    name = "chief" if role == "chief" else (worker_id or f"worker-{socket.gethostname()}-{os.getpid()}")
    if role == "worker" and "chief" in name:
        raise UserError(f"--tuner-id: {name!r} contains 'chief', which Keras Tuner reserves for the chief")
    os.environ.update(KERASTUNER_TUNER_ID=name, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=port)
