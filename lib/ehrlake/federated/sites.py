"""Sites: who holds which rows, and what a site's client reads (conf/federated.yaml).

The lake here holds every site's rows, as a national platform's would; the federation is what
each site's client may see of them. :func:`prepare` (the engineer's job) writes the task's
federated table, ``gold.federated_<task>``: each labelled feature row with its ``site`` (the
task's site conditions, exactly one per row) and its ``split``, the patient-grouped split of
central training (:func:`ehrlake.models.train.split`, same seed: the same test patients). A site's
client then reads the table as the role ``site:<name>``, whose policy condition keeps its own rows
(:func:`extract`): every read is audited, and a role asking for another site's rows gets none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pyspark.sql import functions as F

from ehrlake import features as feats
from ehrlake import home
from ehrlake.errors import ConfigError, EhrlakeError

CONF = home.CONF / "federated.yaml"
SUBGROUPS = ("sex", "age_band", "race", "state")  # kept for the evaluation's subgroup metrics
TRAIN, TEST = "train", "test"
TEST_PERCENT = 20  # of patients held out, as central training's default


@dataclass(frozen=True)
class Settings:
    rounds: int = 10
    local_steps: int = 25
    l1: float = 0.001
    proximal_mu: float = 0.1
    delta: float = 1e-5
    sample_rate: float = 0.1  # patient-level: each row's chance of joining a DP-SGD step
    patient_clip: float = 1.0  # patient-level: each row's gradient norm bound
    private_step: float = 2.0  # patient-level: the fixed step size
    site_clip: float = 1.0  # site-level: each site's update norm bound
    ann_private_learning_rate: float = 0.005  # the ANN's Adam step under DP-SGD (plain: deep_learning.yaml)
    sites: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> site -> SQL condition

    def of(self, task: str) -> dict[str, str]:
        if task not in self.sites:
            having = ", ".join(self.sites) or "none"
            raise ConfigError(f"task {task} has no sites in {CONF.name} (tasks with sites: {having})")
        return self.sites[task]


def settings(path: str | os.PathLike | None = None) -> Settings:
    """``conf/federated.yaml``, or ``path``, or ``$EHRLAKE_FEDERATED_CONF`` (another set of sites,
    e.g. a benchmark's)."""
    raw = yaml.safe_load(Path(path or os.environ.get("EHRLAKE_FEDERATED_CONF") or CONF).read_text()) or {}
    known = set(Settings.__dataclass_fields__) - {"sites"}
    extra = set(raw.get("defaults") or {}) - known
    if extra:
        raise ConfigError(
            f"{CONF.name}: unknown defaults {', '.join(sorted(extra))} (known: {', '.join(sorted(known))})"
        )
    sites = {t: dict(spec.get("sites") or {}) for t, spec in (raw.get("tasks") or {}).items()}
    return Settings(**(raw.get("defaults") or {}), sites=sites)


def table(task: str) -> str:
    return f"gold.federated_{task}"


def role(site: str) -> str:
    return f"site:{site}"


def inputs(task: str) -> list[str]:
    """The model's inputs: the task's numeric features (many-valued codes are target-encoded in
    central training from labels; a federation would have to share per-code label counts, so they
    are left out here)."""
    return feats.model_inputs(feats.task(task))


def prepare(
    lake, task: str, seed: int, test_percent: int = TEST_PERCENT, role_name: str | None = None
) -> dict:
    """Write ``gold.federated_<task>`` from the task's training frame; returns rows per site and
    split, and the rows no site takes. Rebuilt whole each time (the same tables on a re-run)."""
    from ehrlake.lake import WriteMode
    from ehrlake.models.train import only_generated, split

    t = feats.task(task)
    conditions = settings().of(task)
    feats.require(lake, t)  # before the versions: their lookup's error would name a path
    versions = {name: lake.version(name) for name in (t.feature_table, "gold.labels")}
    frame = feats.training_frame(lake, t, versions)
    which = F.lit(None).cast("string")
    matches = F.lit(0)
    for site, condition in reversed(list(conditions.items())):
        taken = F.coalesce(F.expr(condition), F.lit(False))
        which = F.when(taken, F.lit(site)).otherwise(which)
        matches = matches + taken.cast("int")
    frame = frame.withColumn("site", which).withColumn("_sites", matches)
    generated_only = only_generated(frame)  # a throughput run: then the test rows are copies too
    train_rows, test_rows = split(frame, seed, test_percent, generated_only=generated_only)
    keep = ["patient_key", "index_id", "site", "split", "label",
            *[c for c in SUBGROUPS if c in frame.columns], *inputs(task)]  # fmt: skip
    rows = (
        train_rows.drop("cv_fold").withColumn("split", F.lit(TRAIN))
        .unionByName(test_rows.withColumn("split", F.lit(TEST)))
    )  # fmt: skip
    counts = {
        (r["site"], r["split"], r["_sites"]): r["count"]
        for r in rows.groupBy("site", "split", "_sites").count().collect()
    }
    twice = sum(n for (_, _, m), n in counts.items() if m > 1)
    if twice:
        raise ConfigError(f"{CONF.name}: {twice} rows of {task} meet more than one site's condition")
    out = rows.where(F.col("site").isNotNull()).select(*keep)
    with lake.security.job("federated.prepare", ["gold"], role_name) as (_, audit):
        commit = {"ehrlakeJob": "federated.prepare", "ehrlakeSources": str(versions)}
        lake.write(out, table(task), WriteMode.OVERWRITE, evolve_schema=True, commit_info=commit)
        per_site: dict[str, dict[str, int]] = {}
        for (site, part, _), n in counts.items():
            if site is not None:
                per_site.setdefault(site, {TRAIN: 0, TEST: 0})[part] += n
        unsited = sum(n for (site, _, _), n in counts.items() if site is None)
        audit.append(
            (table(task), f"{sum(sum(v.values()) for v in per_site.values())} rows of {len(per_site)} sites")
        )
    return {
        "sites": per_site,
        "unsited": unsited,
        "training_data": versions,
        "generated_only": generated_only,
    }


def arrays(rows, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``rows``' inputs ``names`` (a missing value: NaN) and labels as NumPy arrays, on the driver:
    for one site's rows, or a benchmark's."""
    pdf = rows.select(
        F.array(*[F.col(c).cast("double") for c in names]).alias("x"), F.col("label").cast("double")
    ).toPandas()
    x = pd.DataFrame(pdf["x"].tolist(), dtype=float, columns=names).to_numpy()
    return x, pdf["label"].to_numpy(float)


def extract(lake, task: str, site: str, out: str, role_name: str | None = None) -> int:
    """What a site's client trains on: its training rows of ``gold.federated_<task>``, read as
    ``site:<site>`` (the policy keeps that role to its own rows), saved as NumPy arrays at ``out``
    (the site's own disk). Returns the rows; a site with none is an error."""
    role_name = role_name or role(site)
    names = inputs(task)
    rows = lake.read(table(task), role=role_name).where((F.col("site") == site) & (F.col("split") == TRAIN))
    x, y = arrays(rows, names)  # one site's training rows: what the site holds anyway
    if not len(y):
        raise EhrlakeError(f"role {role_name} reads no training rows of site {site} in {table(task)}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, x=x, y=y, names=np.array(names))
    return len(y)
