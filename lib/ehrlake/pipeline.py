"""``ehrlake pipeline FILE``: declared steps run one after another in one process and one SparkSession.

Each step is an ``ehrlake`` command line (``conf/pipelines/demo.yaml``), so a pipeline is written
and read like the commands a data engineer already knows, and every step keeps its own checks,
audit events and idempotence. Running them in one process saves a JVM start per step (the demo's
sixteen steps started sixteen JVMs). The lake, configuration and role given to the pipeline apply
to every step that takes them. Every step is parsed, and checked to run in this Python runtime,
before the first one runs: a typo in step 12 stops the pipeline before step 1, not after an hour.
The first failing step stops the run, named in one line; re-running the pipeline is safe, since
every step is.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ehrlake.config import build, read_yaml
from ehrlake.errors import ConfigError, EhrlakeError


@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class _PipelineFile:
    steps: tuple[str, ...] = ()  # ehrlake command lines


def load(path: str) -> list[Step]:
    """The steps of a pipeline file: ``steps:``, a list of ehrlake command lines."""
    if not Path(path).is_file():
        raise ConfigError(f"pipeline file {path} does not exist")
    declared = build(_PipelineFile, read_yaml(path), path)
    steps = []
    for i, line in enumerate(declared.steps, 1):
        if not isinstance(line, str) or not line.strip():
            raise ConfigError(f"{path}: step {i} is not an ehrlake command line")
        argv = tuple(shlex.split(line))
        if argv[0] in ("pipeline", "ehrlake"):
            raise ConfigError(f"{path}: step {i} starts with {argv[0]!r}; write the command without it")
        steps.append(Step(argv))
    if not steps:
        raise ConfigError(f"{path}: no steps (steps: a list of ehrlake command lines)")
    return steps


def run(steps: list[Step], run_step: Callable[[Step], int], out=None) -> list[tuple[Step, float]]:
    """Run ``steps`` in order through ``run_step`` (the CLI's in-process dispatch of the step, parsed
    before the first ran, with the pipeline's lake, configuration and role); returns (step, seconds)
    per step. A step returning non-zero stops the run with :class:`EhrlakeError`."""
    out = out or sys.stdout
    timings = []
    for i, step in enumerate(steps, 1):
        print(f"\n[{i}/{len(steps)}] $ ehrlake {step}", file=out, flush=True)
        started = time.perf_counter()
        code = run_step(step)
        seconds = time.perf_counter() - started
        timings.append((step, seconds))
        if code != 0:
            spent = sum(t for _, t in timings)
            raise EhrlakeError(f"pipeline stopped at step {i} ({step}) after {spent:.0f} s; re-run it")
        print(f"    ({seconds:.1f} s)", file=out, flush=True)
    total = sum(t for _, t in timings)
    print(f"\npipeline: {len(steps)} steps in {total:.0f} s, one SparkSession", file=out)
    return timings
