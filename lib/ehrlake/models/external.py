"""External validation: a registered model on a new hospital's dump, without retraining
(``ehrlake evaluate --model M --input DUMP``; docs/models.md, docs/self_supervised.md).

The dump (FHIR R4 NDJSON, FHIR bundles or Synthea CSV; the kind is read from its files) is
ingested into a scratch lake of its own under the lake, ``<lake>/_external/<dataset>``, with the
lake's keys (so its patient keys are the lake's linkage keys), cleaned, and given features and
labels at the index dates of the lake's own features. Every labelled row of the dump is a test
row: the model never saw these patients. Sequence models read sequences built from the dump's
silver with the vocabulary they were trained on; codes the lake never had become their parent
or unknown tokens, as for any patient.

Preparing needs the main runtime (ingest seals columns with Arrow UDFs); the TensorFlow models are
scored in the deep-learning runtime. So a sequence or ANN model takes two commands, the first of
which prepares the dump and says so; the second finds it prepared (the same files: names, sizes
and modification times) and evaluates. A changed dump is prepared again from nothing, so the
scratch lake always holds exactly the dump's records (re-running gives the same tables).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass

from pyspark.sql import functions as F

from ehrlake.errors import EhrlakeError, EnvironmentProblem
from ehrlake.ingest.sources import SourceKind, discover

SCRATCH = "_external"
MARKER = "prepared.json"
KINDS = (SourceKind.FHIR_NDJSON, SourceKind.FHIR_BUNDLES, SourceKind.SYNTHEA_CSV)
SYNTHEA_MARK = re.compile(r"^patients\.csv(\.gz)?$")


@dataclass(frozen=True)
class Dump:
    path: str
    kind: SourceKind
    dataset: str
    fingerprint: str
    files: int


def read_dump(input_path: str) -> Dump:
    """The dump's kind and fingerprint; one clear error when it holds none or several kinds."""
    if not os.path.exists(input_path):
        raise EhrlakeError(f"no file or folder {input_path}")
    found = {}
    for kind in KINDS:
        try:
            files = discover(input_path, kind)
        except EnvironmentProblem:  # none of this kind
            files = []
        if kind == SourceKind.SYNTHEA_CSV and not any(
            SYNTHEA_MARK.match(os.path.basename(f.path)) for f in files
        ):
            files = []
        if files:
            found[kind] = files
    if len(found) != 1:
        what = ", ".join(k.value for k in found) or "none of them"
        raise EhrlakeError(
            f"{input_path}: a dump to evaluate on is FHIR NDJSON, FHIR bundles or Synthea CSV (with "
            f"patients.csv), one kind per folder; found {what}"
        )
    ((kind, files),) = found.items()
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{os.path.relpath(f.path, input_path)}\0{f.size}\0{f.modified_ns}\n".encode())
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.basename(os.path.abspath(input_path)))
    return Dump(os.path.abspath(input_path), kind, name or "external", digest.hexdigest(), len(files))


def scratch_lake(lake, dump: Dump):
    """The dump's scratch lake (``<lake>/_external/<dataset>``), with the lake's keys and policy."""
    from ehrlake.lake import Lake

    root = os.path.join(lake.root, SCRATCH, dump.dataset)
    # built, not opened: the session's catalog stays on the lake (Lake.use_in_sql)
    return Lake(root, lake.spark, security=lake.security.for_root(root) if lake.security else None)


def _marker(lake, dump: Dump) -> dict | None:
    """What preparing this dump recorded, if the scratch lake holds this dump (same fingerprint)."""
    path = os.path.join(lake.root, SCRATCH, dump.dataset, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        marker = json.load(fh)
    return marker if marker.get("fingerprint") == dump.fingerprint else None


def prepared(lake, dump: Dump) -> bool:
    return _marker(lake, dump) is not None


def prepare(lake, dump: Dump, role: str | None = None) -> dict:
    """Ingest, clean and build features of the dump in its scratch lake (from nothing, unless it
    holds this dump already). Returns whether it was prepared now, and what its ingest loaded and
    quarantined (:func:`ingest_summary`, kept with the scratch lake for later runs)."""
    from ehrlake import clean, features, ingest

    marker = _marker(lake, dump)
    if marker is not None:
        return {"prepared": "already", "ingest": marker.get("ingest")}
    root = os.path.join(lake.root, SCRATCH, dump.dataset)
    shutil.rmtree(root, ignore_errors=True)
    scratch = scratch_lake(lake, dump)
    report = ingest.run(scratch, dump.kind, dump.path, source_system=dump.dataset, role=role)
    clean.run(scratch, role=role)
    features.run(scratch, index_dates(lake), role=role)
    summary = ingest_summary(report, scratch.root)
    with open(os.path.join(root, MARKER), "w") as fh:
        marker = {"fingerprint": dump.fingerprint, "input": dump.path, "kind": dump.kind.value}
        json.dump({**marker, "ingest": summary}, fh)
    return {"prepared": "now", "ingest": summary}


def ingest_summary(report, scratch_root: str) -> dict:
    """What the evaluation stands on: a damaged dump is scored on what loaded, and says what did not."""
    t = report.total
    return {
        "scratch_lake": scratch_root,
        "files": report.files_new,
        "records": report.records_read,
        "loaded": t.inserted + t.updated + t.unchanged,
        "duplicate": t.duplicate,
        "quarantined": t.quarantined,
        "with_issues": t.with_issues,
        "notes": list(report.notes),
    }


def format_ingest(summary: dict | None) -> str:
    """One line for the command's output (empty for a dump prepared before summaries were kept)."""
    if not summary:
        return ""
    line = (
        f"{summary['records']:,} records from {summary['files']:,} files: {summary['loaded']:,} loaded, "
        f"{summary['duplicate']:,} duplicates, {summary['quarantined']:,} quarantined"
    )
    if summary["quarantined"]:
        line += f" (with reasons in ops.quarantine of {summary['scratch_lake']})"
    if summary["with_issues"]:
        line += f"; {summary['with_issues']:,} loaded with conformance issues"
    return "\n".join([line, *(f"note: {n}" for n in summary["notes"])])


def index_dates(lake) -> list | None:
    """The as-of dates of the lake's own patient features (a handful), so the dump is labelled at
    the dates the models were trained at; None (the configured dates) where there are none."""
    if not lake.exists("gold.features_patient"):
        return None
    rows = lake.read("gold.features_patient").select(F.to_date("index_time").alias("d")).distinct().collect()
    return sorted(r.d for r in rows if r.d is not None) or None


def evaluate(lake, mv, input_path: str, role: str | None = None) -> dict:
    """``mv`` on every labelled row of the dump at ``input_path``, recorded in the gold model
    tables as dataset ``<dump folder name>``. In the main runtime the dump is prepared first; a
    TensorFlow model's result then says which command evaluates it (the deep-learning runtime's)."""
    from ehrlake import features as feats
    from ehrlake.models.algorithms import SEQUENCE_TRANSFORMER
    from ehrlake.models.evaluate import format_value
    from ehrlake.models.train import score_column
    from ehrlake.models.versions import record
    from ehrlake.session import arrow_paths_supported

    dump = read_dump(input_path)
    tensorflow = mv.algorithm in ("ann", SEQUENCE_TRANSFORMER)
    if arrow_paths_supported():
        how = prepare(lake, dump, role)
        if tensorflow:
            return {
                "model": mv.label,
                "dataset": dump.dataset,
                "prepared": how["prepared"],
                "ingest": how["ingest"],
                "next": f".venv-dl/bin/ehrlake evaluate --model {mv.model_id} --version {mv.version} "
                f"--input {input_path}",
            }
    elif not prepared(lake, dump):
        raise EhrlakeError(
            f"{input_path} is not prepared for evaluation (or has changed since): run .venv/bin/ehrlake "
            f"evaluate --model {mv.model_id} --input {input_path} first (ingest needs the main runtime)"
        )
    scratch = scratch_lake(lake, dump)
    t = feats.task(mv.task)
    if mv.algorithm == SEQUENCE_TRANSFORMER:
        from ehrlake.dl.finetune import external_predictions

        pred = external_predictions(lake, scratch, mv)
    elif mv.algorithm == "ann":
        from ehrlake.dl.predict import external_ann_predictions

        pred = external_ann_predictions(lake, scratch, mv)
    else:
        rows = feats.training_frame(scratch, t)
        pred = (
            mv.load(lake).transform(rows).withColumn("score", score_column(mv.params.get("pos_weight", 1.0)))
        )
    if pred.limit(1).count() == 0:
        raise EhrlakeError(
            f"{input_path} has no labelled rows of {mv.task} (its patients, dates or outcomes do not "
            "make any): nothing to evaluate on"
        )
    with lake.security.job("evaluate", ["gold"], role) as (_, audit):
        overall = record(lake, mv, pred, dump.dataset)
        auroc = format_value(overall["auroc"]["value"])
        audit.append(
            ("gold.model_metrics", f"{mv.label} on {dump.dataset} ({dump.kind.value}): AUROC {auroc}")
        )
    marker = _marker(lake, dump) or {}
    return {"model": mv.label, "dataset": dump.dataset, "ingest": marker.get("ingest"), "metrics": overall}
