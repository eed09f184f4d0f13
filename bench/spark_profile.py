"""Read a Spark event log back into a profile: where a run's time and bytes went, per job.

Spark writes one JSON event per line when ``spark.eventLog.enabled`` is on. This folds the events
into one row per job (its description or call site, wall seconds, task seconds, GC, shuffle bytes
written and read, spill, input and output bytes, result bytes sent to the driver) and a total, so a
benchmark can commit *which* jobs grow with the data next to its timings.

    .venv/bin/python bench/spark_profile.py EVENT_LOG [--top 25]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

FIELDS = ("task_s", "gc_s", "shuffle_write", "shuffle_read", "spill_disk", "input", "output", "result")


@dataclass(kw_only=True)
class Work:
    """What tasks did, summed: their count, seconds, GC, and bytes shuffled, spilled, read, written
    and sent to the driver."""

    tasks: int = 0
    task_s: float = 0.0
    gc_s: float = 0.0
    shuffle_write: int = 0
    shuffle_read: int = 0
    spill_disk: int = 0
    input: int = 0
    output: int = 0
    result: int = 0

    def add(self, metrics: dict) -> None:
        """One task's ``Task Metrics`` (a ``SparkListenerTaskEnd`` event)."""
        shuffle_read = metrics.get("Shuffle Read Metrics", {})
        self.tasks += 1
        self.task_s += metrics.get("Executor Run Time", 0) / 1000
        self.gc_s += metrics.get("JVM GC Time", 0) / 1000
        self.shuffle_read += shuffle_read.get("Remote Bytes Read", 0) + shuffle_read.get(
            "Local Bytes Read", 0
        )
        self.shuffle_write += metrics.get("Shuffle Write Metrics", {}).get("Shuffle Bytes Written", 0)
        self.spill_disk += metrics.get("Disk Bytes Spilled", 0)
        self.input += metrics.get("Input Metrics", {}).get("Bytes Read", 0)
        self.output += metrics.get("Output Metrics", {}).get("Bytes Written", 0)
        self.result += metrics.get("Result Size", 0)


@dataclass(kw_only=True)
class JobProfile(Work):
    job: int
    name: str
    phase: str | None = None  # the local property ``ehrlake.bench.phase`` a benchmark set, if any
    wall_s: float = 0.0
    stages: int = 0


@dataclass(kw_only=True)
class StageProfile(Work):
    """A stage: its job, the operators it ran (Spark's RDD scopes: Exchange, Window, MapInArrow,
    WholeStageCodegen ...) and its tasks' sums; the finest grain an event log attributes time to."""

    stage: int
    job: int
    operators: str


@dataclass
class Profile:
    wall_s: float  # first job start to last job end
    jobs: list[JobProfile] = field(default_factory=list)
    stages: list[StageProfile] = field(default_factory=list)

    def total(self) -> dict:
        sums = {f: sum(getattr(j, f) for j in self.jobs) for f in FIELDS}
        busy = sum(j.wall_s for j in self.jobs)
        return {"jobs": len(self.jobs), "wall_s": round(self.wall_s, 2), "in_jobs_s": round(busy, 2), **sums}

    def by_name(self) -> list[dict]:
        """Jobs of the same name (e.g. every merge's scan) added up, heaviest wall time first."""
        groups: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        for j in self.jobs:
            g = groups[j.name]
            g["count"] += 1
            g["wall_s"] += j.wall_s
            for f in FIELDS:
                g[f] += getattr(j, f)
        rows = [{"name": n, **{k: _rounded(v) for k, v in g.items()}} for n, g in groups.items()]
        return sorted(rows, key=lambda r: -r["wall_s"])

    def heaviest_stages(self, top: int) -> list[dict]:
        ranked = sorted(self.stages, key=lambda st: -st.task_s)[:top]
        return [
            {k: _rounded(v) if isinstance(v, float) else v for k, v in asdict(st).items()} for st in ranked
        ]


def _rounded(v: float) -> float | int:
    return round(v, 2) if isinstance(v, float) and not v.is_integer() else int(v)


def _name(props: dict) -> str:
    """What a job is: its description (``setJobDescription``) else the user call site."""
    desc = props.get("spark.job.description")
    site = props.get("callSite.short") or ""
    return (desc or site or "?").splitlines()[0][:120]


def _events(paths: list[Path]):
    for path in paths:
        with open(path) as handle:
            yield from (json.loads(line) for line in handle)


def read(paths: list[Path]) -> Profile:
    jobs: dict[int, JobProfile] = {}
    stages: dict[int, StageProfile] = {}
    stage_job: dict[int, int] = {}
    started: dict[int, float] = {}
    first, last = None, None
    for event in _events(paths):
        kind = event.get("Event")
        if kind == "SparkListenerJobStart":
            jid = event["Job ID"]
            props = event.get("Properties") or {}
            jobs[jid] = JobProfile(job=jid, name=_name(props), phase=props.get("ehrlake.bench.phase"))
            jobs[jid].stages = len(event.get("Stage IDs", []))
            for sid in event.get("Stage IDs", []):
                stage_job[sid] = jid
            started[jid] = event["Submission Time"] / 1000
            first = started[jid] if first is None else min(first, started[jid])
        elif kind == "SparkListenerStageSubmitted":
            info = event["Stage Info"]
            sid = info["Stage ID"]
            stages.setdefault(
                sid, StageProfile(stage=sid, job=stage_job.get(sid, -1), operators=_operators(info))
            )
        elif kind == "SparkListenerJobEnd":
            jid = event["Job ID"]
            end = event["Completion Time"] / 1000
            jobs[jid].wall_s = end - started[jid]
            last = end if last is None else max(last, end)
        elif kind == "SparkListenerTaskEnd" and event.get("Task Metrics"):
            for owner in (jobs.get(stage_job.get(event["Stage ID"], -1)), stages.get(event["Stage ID"])):
                if owner is not None:
                    owner.add(event["Task Metrics"])
    wall = (last - first) if first is not None and last is not None else 0.0
    return Profile(wall, [jobs[k] for k in sorted(jobs)], [stages[k] for k in sorted(stages)])


def _operators(info: dict) -> str:
    """The distinct operator scopes of a stage's RDDs, in first-seen order."""
    names: list[str] = []
    for rdd in sorted(info.get("RDD Info", []), key=lambda r: r.get("RDD ID", 0)):
        scope = rdd.get("Scope")
        name = json.loads(scope).get("name") if scope else rdd.get("Name")
        if name and name not in names:
            names.append(name)
    return ", ".join(names)[:300]


def event_log(folder: Path) -> list[Path]:
    """The files of the one application log Spark wrote into ``folder`` (``spark.eventLog.dir``):
    a single file, or a rolling log's folder (``eventlog_v2_*``) of parts in order."""
    logs = [p for p in folder.iterdir() if not p.name.endswith(".inprogress")]
    if len(logs) != 1:
        raise SystemExit(f"{folder}: expected one finished event log, found {[p.name for p in logs]}")
    if logs[0].is_dir():
        parts = [p for p in logs[0].iterdir() if p.name.startswith("events_")]
        return sorted(parts, key=lambda p: int(p.name.split("_")[1]))
    return logs


def table(rows: list[dict], top: int) -> str:
    head = "| job (count) | wall s | task s | GC s | shuffle write MB | spill MB | result MB |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows[:top]:
        lines.append(
            f"| {r['name']} ({r['count']}) | {r['wall_s']:.1f} | {r['task_s']:.1f} | {r['gc_s']:.1f} | "
            f"{r['shuffle_write'] / 1e6:.1f} | {r['spill_disk'] / 1e6:.1f} | {r['result'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="an event log file, or the folder holding one")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    profile = read(event_log(args.log) if args.log.is_dir() else [args.log])
    print(json.dumps(profile.total(), indent=1))
    print(table(profile.by_name(), args.top))
    for st in profile.heaviest_stages(args.top):
        print(st)
    return 0


if __name__ == "__main__":
    sys.exit(main())
