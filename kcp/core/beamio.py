"""What every Beam pipeline here shares (preprocessing and batch prediction): the local runner
defaults (chosen by the planned input count), the planned source as a Beam read
(`ReadSource`), the tagging of elements as examples or dead letters, and progress lines
while a local job runs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import tempfile
import threading
import time
import uuid

import apache_beam as beam

# Beam knows the Dask runner only by its full path; accept the short name too.
RUNNER_ALIASES = {
    "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "--runner=DaskRunner": "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
}

DEAD_LETTER = "dead_letter"
EXAMPLE = "example"


DASK_WORKER_WAIT_S = 60.0  # for a Dask scheduler's first worker (workers may start after it)
IN_PROCESS_BELOW = 20_000  # planned inputs under which the local runner runs in this process


def beam_arg_list(beam_args) -> list[str]:
    """The API's `beam_args` as Beam's argv: a list or tuple of flags as it is, one string split as a
    shell would ("--runner=DataflowRunner --region=europe-west1"); anything else is one line."""
    if isinstance(beam_args, str):
        return shlex.split(beam_args)
    if not isinstance(beam_args, (list, tuple)) or not all(isinstance(arg, str) for arg in beam_args):
        from kcp.core.errors import UserError

        raise UserError(f"beam_args: expected a list of flags such as ['--runner=DirectRunner'], got {beam_args!r}")
    return list(beam_args)


def local_runner_defaults(beam_args: list[str], planned_inputs: int | None = None) -> list[str]:
    """Fills in the local runner when the user named none.

    Beam 2.77's plain DirectRunner first tries to download the Prism runner and can hang
    offline, so the local default is the FnApiRunner. Below IN_PROCESS_BELOW planned inputs
    it runs in this process (`--direct_running_mode=in_memory`: no worker start-up, which
    costs more than a small source's whole job); otherwise, or when the size is unknown, in
    one subprocess per core. `--direct_running_mode` or `--direct_num_workers` after `--`
    override the choice.
    """
    beam_args = [RUNNER_ALIASES.get(arg, arg) for arg in beam_args]
    given = {arg.split("=", 1)[0].lstrip("-") for arg in beam_args if arg.startswith("--")}
    defaults = []
    if "runner" not in given:
        defaults.append("--runner=FnApiRunner")
        small = planned_inputs is not None and planned_inputs < IN_PROCESS_BELOW
        if "direct_running_mode" not in given:
            in_process = small and "direct_num_workers" not in given
            defaults.append(f"--direct_running_mode={'in_memory' if in_process else 'multi_processing'}")
        if "direct_num_workers" not in given and not (small and "direct_running_mode" not in given):
            defaults.append(f"--direct_num_workers={os.cpu_count() or 1}")
    return defaults + list(beam_args)


def select(tagged, tag: str, label: str):
    """The values tagged `tag` in a PCollection of (tag, value).

    Used instead of multi-output ParDos and Partition: Beam 2.77's Dask runner sent every
    element to every output of those, duplicating the data; a Filter works on every runner.
    """
    return tagged | f"{label}Select" >> beam.Filter(lambda item: item[0] == tag) \
        | f"{label}Values" >> beam.Map(lambda item: item[1])


def dead_letter(key: str, source: str, reason: str) -> str:
    """One line of a dead-letter file: the input's key, its source and why it was not used."""
    return json.dumps({"key": key, "source": source, "reason": reason}, sort_keys=True)


class ReadSource(beam.PTransform):
    """A planned source as a Beam read: the plan's small read tasks go into the graph, the
    workers turn each into records (`kcp.core.sources.read_task`). A folder's records (file
    paths) are redistributed so that decoding spreads over the workers; other tasks are
    already row ranges or whole files, spread by Create's own redistribution."""

    def __init__(self, plan):
        super().__init__()
        self._plan = plan

    def expand(self, pipeline):
        from kcp.core.sources import read_task

        plan = self._plan
        records = (pipeline
                   | "Tasks" >> beam.Create(list(plan.tasks), reshuffle=len(plan.tasks) > 1)
                   | "ReadTasks" >> beam.FlatMap(lambda task: read_task(plan, task)))
        if plan.kind == "folder":
            records = records | "SpreadFiles" >> beam.Reshuffle()
        return records


class _BeamNotices(logging.Filter):
    """Drops two Beam warnings that point at no problem: "No shards found to finalize", printed on
    every run whose dead letters are empty (`skip_if_empty=True` makes that the expected case), and
    the Dask runner's "The new default partition size is 128…", printed once per step of every job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("No shards found to finalize", "The new default partition size"))


logging.getLogger("apache_beam.io.filebasedsink").addFilter(_BeamNotices())
logging.getLogger("apache_beam.runners.dask.transform_evaluator").addFilter(_BeamNotices())

PROGRESS_WRITE_SECONDS = 2.0


class CountProgress(beam.DoFn):
    """Passes elements through and keeps a count per worker process in a small file under
    `directory` (rewritten at most every PROGRESS_WRITE_SECONDS and at each bundle's end), so
    the driver can print progress while a local job runs (`ProgressReporter`)."""

    def __init__(self, directory: str):
        self._directory = directory
        self._count, self._written_at, self._path = 0, 0.0, None

    def setup(self):
        os.makedirs(self._directory, exist_ok=True)
        self._path = os.path.join(self._directory, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def _write(self):
        temporary = f"{self._path}.tmp"
        with open(temporary, "w") as handle:
            handle.write(str(self._count))
        os.replace(temporary, self._path)
        self._written_at = time.monotonic()

    def process(self, element):
        self._count += 1
        if time.monotonic() - self._written_at > PROGRESS_WRITE_SECONDS:
            self._write()
        yield element

    def finish_bundle(self):
        if self._count:
            self._write()


class ProgressReporter:
    """A driver thread that reports `progress: N of ~M inputs read, R/s, T s` every `every`
    seconds while a local job runs, from CountProgress's files. `directory` is None when the
    runner is not local (Dataflow and Dask show their own progress): then it does nothing."""

    def __init__(self, directory: str | None, planned: int, report, every: float = 10.0, what: str = "inputs read"):
        self._directory, self._planned, self._report = directory, planned, report
        self._every, self._what = every, what
        self._stop = threading.Event()
        self._thread = None
        self._started = time.monotonic()

    def count(self) -> int:
        total = 0
        for name in os.listdir(self._directory) if self._directory and os.path.isdir(self._directory) else ():
            if not name.endswith(".tmp"):
                try:
                    with open(os.path.join(self._directory, name)) as handle:
                        total += int(handle.read() or 0)
                except (OSError, ValueError):
                    pass
        return total

    def _run(self):
        while not self._stop.wait(self._every):
            done, elapsed = self.count(), time.monotonic() - self._started
            self._report(f"progress: {done:,} of ~{self._planned:,} {self._what}, "
                         f"{done / max(elapsed, 1e-9):,.0f}/s, {elapsed:.0f} s")

    def __enter__(self):
        if self._directory:
            self._thread = threading.Thread(target=self._run, name="kcp-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
        return False


def progress_directory(options: dict) -> str | None:
    """A fresh local folder for CountProgress files when the runner is the local FnApiRunner."""
    if "FnApiRunner" not in str(options.get("runner")):
        return None
    return os.path.join(tempfile.gettempdir(), f"kcp-progress-{uuid.uuid4().hex[:12]}")


def checked_pipeline(options, local_paths: list[str] = ()):
    """`beam.Pipeline(options)`, made before the job touches anything, so that options Beam refuses
    (an unknown runner, Dataflow without project, region or temp_location, a --setup_file not found)
    are one line (UserError) and the previous outputs are kept. A DataflowRunner job refuses
    `local_paths` (the run directory, a source, an output on this machine), which its workers,
    on other machines, can neither read nor write; a Dask scheduler is checked (`check_dask_scheduler`)."""
    from kcp.core import storage
    from kcp.core.errors import UserError

    settings = options.get_all_options()
    if settings.get("setup_file") and not storage.exists(settings["setup_file"]):
        raise UserError(f"Beam options: --setup_file {settings['setup_file']} is not there (give the path of "
                        "this project's setup.py, e.g. from the repository root ./setup.py)")
    if "Dataflow" in str(settings.get("runner") or ""):
        local = [path for path in local_paths if path and not storage.is_remote(path)]
        if local:
            raise UserError(f"Beam options: a {settings['runner']} job's workers run on other machines and cannot "
                            f"reach {local[0]} on this one; use gs:// paths (the run directory, the source)")
    if "dask" in str(settings.get("runner") or "").lower():
        try:
            from apache_beam.runners.dask.dask_runner import DaskOptions  # registers --dask_client_address
        except ImportError as error:
            raise UserError(f"Beam options: the Dask runner needs the dask extra ({error}): "
                            "pip install -c constraints.txt -e '.[dask]'") from None

        if address := options.view_as(DaskOptions).address:
            check_dask_scheduler(address, local_paths)
    try:
        return beam.Pipeline(options=options)
    except (ValueError, RuntimeError) as error:  # Beam's own option checks: "Pipeline has validations errors"
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise UserError(f"Beam options: {text.removeprefix('Pipeline has validations errors: ')[:500]}") from None


def for_cluster_workers(path: str, options) -> str:
    """`path` as workers elsewhere can name it: a local path made absolute under the Dask runner
    (whose workers resolve a relative one from their own working folder); else `path` as it is.
    For the paths kcp chose itself (a new or the newest run, its export); a relative path the
    user gave is refused by `checked_pipeline`."""
    runner = str(options.get_all_options().get("runner") or "").lower()
    if "dask" in runner and path and not os.path.isabs(path):
        from kcp.core import storage

        return path if storage.is_remote(path) else os.path.abspath(path)
    return path


def check_dask_scheduler(address: str, local_paths=()) -> None:
    """One line (UserError) when no Dask scheduler answers at `address` ([tcp://]HOST:PORT; the
    runner's own client waits 30 s and ends in a traceback), or when one of `local_paths` is
    relative: the cluster's workers would resolve it from their own working folder."""
    import socket

    from kcp.core import storage
    from kcp.core.errors import UserError

    relative = [path for path in local_paths if path and not storage.is_remote(path) and not os.path.isabs(path)]
    if relative:
        raise UserError(f"Beam options: a Dask cluster's workers resolve {relative[0]} from their own working folder; "
                        f"give it as an absolute path ({os.path.abspath(relative[0])}) or a gs:// one")
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        reason = error.strerror or str(error) if isinstance(error, OSError) else f"no port in {address!r}"
        raise UserError(f"Beam options: --dask_client_address {address}: no Dask scheduler answers there ({reason}); "
                        "start one (`dask scheduler`) or leave the option out for a cluster on this machine") from None
    from distributed import Client

    with Client(address, timeout=DASK_WORKER_WAIT_S, set_as_default=False) as client:
        try:  # a scheduler without a worker runs nothing and says nothing: the job would wait forever
            client.wait_for_workers(1, timeout=DASK_WORKER_WAIT_S)
        except (TimeoutError, asyncio.TimeoutError):
            raise UserError(f"Beam options: --dask_client_address {address}: the Dask scheduler there has no worker "
                            f"after {DASK_WORKER_WAIT_S:g} s; start one (`dask worker {address}`)") from None
