"""What every Beam pipeline here shares (preprocessing and batch prediction): the local runner
defaults and the tagging of elements as examples or dead letters."""

from __future__ import annotations

import json
import os

import apache_beam as beam

# Beam knows the Dask runner only by its full path; accept the short name too.
RUNNER_ALIASES = {
    "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "--runner=DaskRunner": "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
}

DEAD_LETTER = "dead_letter"
EXAMPLE = "example"


def local_runner_defaults(beam_args: list[str]) -> list[str]:
    """Fills in the local runner when the user named none.

    Beam 2.77's plain DirectRunner first tries to download the Prism runner and can hang
    offline, so the local default is the FnApiRunner using every core in subprocesses.
    """
    beam_args = [RUNNER_ALIASES.get(arg, arg) for arg in beam_args]
    given = {arg.split("=", 1)[0].lstrip("-") for arg in beam_args if arg.startswith("--")}
    defaults = []
    if "runner" not in given:
        defaults.append("--runner=FnApiRunner")
        if "direct_running_mode" not in given:
            defaults.append("--direct_running_mode=multi_processing")
        if "direct_num_workers" not in given:
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
