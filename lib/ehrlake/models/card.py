"""A model card: what a model version is for, what it was made from, how well it does and for whom,
what it must not be used on, and who approved it, as Markdown and HTML (``ehrlake models card``).

Everything on the card comes from the lake: the registry row (parameters, inputs and their
accepted ranges, data versions, metrics with intervals), the evaluation tables
(``gold.model_metrics`` subgroups, ``gold.model_calibration``) and ``gold.model_approvals``.
A reviewer reads it before approving (:mod:`ehrlake.models.governance`).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

from pyspark.sql import functions as F

from ehrlake.models import governance, registry, versions

GAP_WORTH_NAMING = 0.05  # a subgroup AUROC this far below the whole test set's is a limitation


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    header: list[str] | None = None  # a table's columns, its rows in ``rows``
    rows: list[list[str]] = field(default_factory=list)


def _figure(metric: dict) -> str:
    value = metric.get("value")
    if value is None:
        return "undefined"
    if metric.get("ci_low") is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({metric['ci_low']:.3f}-{metric['ci_high']:.3f})"


def _evaluation_rows(lake, table: str, mv) -> list:
    if not lake.exists(table):
        return []
    rows = lake.read(table).where(F.col("evaluation") == versions.evaluation_name(mv.model_id, mv.version))
    return rows.collect()  # one evaluation: tens of rows


def sections(lake, mv) -> list[Section]:
    from ehrlake import features as feats

    task = feats.TASKS.get(mv.task)
    use = Section("Intended use")
    use.lines.append(f"Predicts `{mv.task}`" + (f": {task.definition}" if task else "."))
    use.lines.append(
        "Decision support for population risk stratification and review by clinicians; not a "
        "diagnosis, and not for patients outside the population below."
    )
    inputs = Section("Inputs")
    accepts = mv.params.get("accepts") or {}
    kind = mv.params.get("modality") or (f"tabular, {task.feature_table}" if task else "as trained")
    inputs.lines.append(f"{len(mv.features)} inputs ({kind}).")
    if accepts:
        inputs.lines.append("Accepted ranges (training rows); scoring refuses a patient beyond them:")
        inputs.header = ["input", "lowest", "highest"]
        inputs.rows = [[name, f"{lo:g}", f"{hi:g}"] for name, (lo, hi) in sorted(accepts.items())]
    else:
        inputs.lines.append("No accepted ranges recorded: scoring does not check this model's inputs.")
    data = Section("Population and data")
    data.lines.append(f"Algorithm `{mv.algorithm}`, trained {mv.created_at:%Y-%m-%d} as role "
                      f"`{mv.params.get('trained_by', 'not recorded')}`.")  # fmt: skip
    data.header = ["table", "Delta version"]
    data.rows = [[t, str(v)] for t, v in sorted(mv.training_data.items())]
    p = mv.params
    if p.get("federated"):  # docs/federated.md
        rows = ", ".join(f"{s} {n:,}" for s, n in (p.get("site_rows") or {}).items())
        private = (
            f"{p['privacy']}-level differential privacy, epsilon {p['epsilon']:.2f} at delta {p['delta']:g}"
            if p.get("epsilon") is not None
            else "no differential privacy"
        )
        data.lines.append(
            f"Federated: {p['strategy']}, {p['rounds']} rounds over {len(p['sites'])} sites ({rows} "
            f"training rows), each site's rows read by its own role; {private}."
        )
    test = mv.params.get("test_patients", "real")
    data.lines.append(f"Test patients: {test} (held out by patient, never seen in training).")
    metrics = Section("Performance on held-out patients", ["95% bootstrap intervals over patients."])
    metrics.header = ["metric", "value (95% CI)"]
    metrics.rows = [
        [k, _figure(v)] for k, v in sorted(mv.metrics.items()) if isinstance(v, dict) and "value" in v
    ]
    evaluated = _evaluation_rows(lake, "gold.model_metrics", mv)
    groups = sorted(
        (r for r in evaluated if r.kind != "overall" and r.metric == "auroc" and r.value is not None),
        key=lambda r: (r.kind, r.subgroup),
    )
    subgroups = Section("Subgroups (AUROC)", header=["group", "AUROC (95% CI)", "rows", "gap"])
    subgroups.rows = [
        [f"{r.kind} = {r.subgroup}", _figure(r.asDict()), f"{r.n:,}", f"{r.gap:+.3f}"] for r in groups
    ]
    if not groups:
        subgroups.lines.append("No subgroup evaluation recorded.")
    calibration = Section(
        "Calibration (test, by score decile)", header=["bin", "mean predicted", "observed", "rows"]
    )
    calibration.rows = [
        [str(r.bin), f"{r.mean_predicted:.3f}", f"{r.observed_rate:.3f}", f"{r.n:,}"]
        for r in sorted(_evaluation_rows(lake, "gold.model_calibration", mv), key=lambda r: r.bin)
    ]
    if not calibration.rows:
        calibration.lines.append("No calibration recorded.")
    limits = Section("Limitations")
    if test != "real":
        limits.lines.append(
            "Tested on generated copies of the sample patients only: "
            "the figures are not an estimate for real patients."
        )
    for r in groups:
        if r.gap <= -GAP_WORTH_NAMING:
            limits.lines.append(
                f"Weaker for {r.kind} = {r.subgroup}: AUROC {r.gap:+.3f} against the whole test set."
            )
    if not accepts:
        limits.lines.append("Inputs outside the training population are not refused.")
    limits.lines.append(
        "Trained on one lake's sources; validate on a new hospital's data "
        "(ehrlake evaluate --input) before use there."
    )
    approvals = Section("Approvals", header=["decided", "decision", "role", "user", "note"])
    approvals.rows = [
        [f"{d.decided_at:%Y-%m-%d %H:%M}", d.decision, d.role, d.os_user or "", d.note or ""]
        for d in governance.decisions(lake, mv.model_id, mv.version)
    ]
    if not approvals.rows:
        approvals.lines.append("Not reviewed: this version cannot be promoted to production.")
    return [use, inputs, data, metrics, subgroups, calibration, limits, approvals]  # fmt: skip


def markdown(mv, parts: list[Section]) -> str:
    out = [f"# Model card: {mv.label}", "", f"Task `{mv.task}`, status **{mv.status}**.", ""]
    for s in parts:
        out += [f"## {s.title}", ""]
        out += [*(f"- {line}" if s.title == "Limitations" else line for line in s.lines), ""]
        if s.header and s.rows:
            out.append("| " + " | ".join(s.header) + " |")
            out.append("|" + "---|" * len(s.header))
            out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in s.rows]
            out.append("")
    return "\n".join(out)


def to_html(mv, parts: list[Section]) -> str:
    e = html.escape
    body = [
        f"<h1>Model card: {e(mv.label)}</h1>",
        f"<p>Task <code>{e(mv.task)}</code>, status <b>{e(mv.status)}</b>.</p>",
    ]
    for s in parts:
        body.append(f"<h2>{e(s.title)}</h2>")
        body += [f"<p>{e(line)}</p>" for line in s.lines]
        if s.header and s.rows:
            head = "".join(f"<th>{e(c)}</th>" for c in s.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in s.rows)
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    )
    meta = f"<meta charset='utf-8'><title>{e(mv.label)}</title><style>{style}</style>"
    return f"<!doctype html><html><head>{meta}</head><body>{''.join(body)}</body></html>"


def write(lake, model_id: str, version: int | None = None, out: str | None = None) -> tuple[str, str]:
    """Write the card of ``model_id`` (its latest version where ``version`` is None) as
    ``card.md`` and ``card.html`` in ``out`` (default: beside the model's artifact)."""
    mv = registry.get(lake, model_id, version)
    parts = sections(lake, mv)
    folder = out or os.path.join(lake.root, registry.artifact_dir(mv.model_id, mv.version))
    os.makedirs(folder, exist_ok=True)
    paths = (os.path.join(folder, "card.md"), os.path.join(folder, "card.html"))
    for path, text in zip(paths, (markdown(mv, parts), to_html(mv, parts)), strict=True):
        with open(path, "w") as handle:
            handle.write(text)
    return paths
