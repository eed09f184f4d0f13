"""The models part of ``ehrlake report``: comparison table, calibration curves and subgroup gaps.

Reads only the gold model tables (bounded by the number of model versions, not by patients).
"""

from __future__ import annotations

import base64
import html
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from ehrlake.models import registry, versions  # noqa: E402
from ehrlake.models.evaluate import FINDING_THRESHOLD  # noqa: E402


def _latest(lake, supervised: bool = True) -> list[registry.ModelVersion]:
    """The latest version of every model: those evaluated on test patients (AUROC), or with
    ``supervised=False`` the self-supervised ones (an encoder's masked-code metrics)."""
    latest: dict[str, registry.ModelVersion] = {}
    for mv in registry.versions(lake):
        latest[mv.model_id] = mv  # versions come in ascending order
    return [m for m in latest.values() if ("auroc" in m.metrics) == supervised]


def pretraining_table(encoders: list[registry.ModelVersion]) -> str:
    """Self-supervised encoders on held-out data: the sequence encoder's masked-code loss and
    accuracy against the untrained encoder and the codes' frequencies; the image trunk's
    contrastive loss and pair accuracy against the untrained trunk (docs/self_supervised.md)."""
    if not encoders:
        return ""

    def cells(values, fmt):
        return "".join(f"<td>{v:{fmt}}</td>" if isinstance(v, float) else "<td></td>" for v in values)

    rows = []
    for m in encoders:
        contrastive = "contrastive_loss" in m.metrics
        loss = m.metrics.get("contrastive_loss" if contrastive else "masked_code_loss", {})
        acc = m.metrics.get("pair_accuracy" if contrastive else "masked_code_accuracy", {})
        objective = "views paired (NT-Xent)" if contrastive else "masked codes"
        rows.append(
            f"<tr><td>{html.escape(m.label)}</td><td>{objective}</td><td>{m.params.get('epochs', '')}</td>"
            + cells((loss.get("value"), loss.get("frequency"), loss.get("untrained")), ".2f")
            + cells((acc.get("value"), acc.get("frequency"), acc.get("untrained")), ".1%")
            + "</tr>"
        )
    return (
        "<h2>Self-supervised encoders (validation data, no labels used)</h2><table border='1' "
        "cellpadding='4' style='border-collapse:collapse'><tr><th>model</th><th>objective</th><th>epochs</th>"
        "<th>loss</th><th>codes' frequencies</th><th>untrained</th>"
        "<th>accuracy</th><th>most frequent code</th><th>untrained</th></tr>"
        + "".join(rows)
        + "</table><p>Lower loss than untrained (and than the codes' frequencies) means the encoder "
        "learned from context; fine-tuned models appear above with their test AUROC.</p>"
    )


def comparison_table(models: list[registry.ModelVersion]) -> str:
    def cell(m: dict, name: str) -> str:
        v = m.get(name) or {}
        if v.get("value") is None:
            return "<td></td>"
        ci = f" ({v['ci_low']:.3f}–{v['ci_high']:.3f})" if v.get("ci_low") is not None else ""
        return f"<td>{v['value']:.3f}{ci}</td>"

    rows = "".join(
        f"<tr><td>{html.escape(m.task)}</td><td>{html.escape(m.name)}</td><td>v{m.version}</td>"
        f"<td>{html.escape(m.status)}</td>{cell(m.metrics, 'auroc')}{cell(m.metrics, 'auprc')}"
        f"{cell(m.metrics, 'brier')}{cell(m.metrics, 'accuracy')}{cell(m.metrics, 'recall')}</tr>"
        for m in sorted(models, key=lambda m: (m.task, -(m.metrics.get("auroc", {}).get("value") or 0)))
    )
    return (
        "<h2>Model comparison (held-out patients, 95% bootstrap intervals)</h2><table border='1' "
        "cellpadding='4' style='border-collapse:collapse'><tr><th>task</th><th>model</th><th>version</th>"
        "<th>status</th><th>AUROC</th><th>AUPRC</th><th>Brier</th><th>accuracy</th><th>recall</th></tr>"
        + rows
        + "</table><p>Threshold of accuracy and recall: the training base rate (calibrated risks); image "
        f"findings (cnn): the most accurate on the validation split (without one, {FINDING_THRESHOLD}). "
        "cnn / ann: TensorFlow (docs/deep_learning.md).</p>"
    )


def figures(lake, png) -> list[tuple[str, str]]:
    """(png base64, caption) per task: calibration of the latest versions, subgroup AUROC gaps."""
    models = _latest(lake)
    out = []
    if not models or not lake.exists("gold.model_calibration"):
        return out
    evaluations = {versions.evaluation_name(m.model_id, m.version): m for m in models}
    calib = lake.read("gold.model_calibration").where(F.col("evaluation").isin(list(evaluations))).toPandas()
    metrics = (
        lake.read("gold.model_metrics")
        .where(F.col("evaluation").isin(list(evaluations)) & (F.col("metric") == "auroc"))
        .toPandas()
    )
    for task in sorted({m.task for m in models}):
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([0, 1], [0, 1], color="#999", linestyle=":")
        for ev, m in evaluations.items():
            part = calib[calib["evaluation"] == ev].sort_values("bin")
            if m.task == task and not part.empty:
                ax.plot(part["mean_predicted"], part["observed_rate"], marker="o", label=m.name)
        ax.set_xlabel("mean predicted risk")
        ax.set_ylabel("observed rate")
        ax.legend()
        out.append((png(fig), f"Calibration of the latest {task} models (held-out patients)"))
        best = max((m for m in models if m.task == task), key=lambda m: m.metrics["auroc"]["value"] or 0)
        sub = metrics[
            (metrics["evaluation"] == versions.evaluation_name(best.model_id, best.version))
            & (metrics["kind"] != "overall")
        ]
        sub = sub[sub["value"].notna()]
        if not sub.empty:
            out.append(subgroup_figure(sub, best, png))
    return out


def label_efficiency_figures(models: list[registry.ModelVersion], png) -> list[tuple[str, str]]:
    """Per task trained at several shares of its labels (``train --label-fraction``, the bench):
    test AUROC against the share, the mean over seeds with their range, one line per model (the
    fine-tuned encoder and the same network from scratch; docs/self_supervised.md). Versions
    without a defined AUROC (a test split of one class) are left out."""
    points: dict[str, dict[str, dict[float, list[float]]]] = {}
    for mv in models:
        share, auroc = mv.params.get("label_fraction"), (mv.metrics.get("auroc") or {}).get("value")
        if share is not None and auroc is not None:
            points.setdefault(mv.task, {}).setdefault(mv.model_id, {}).setdefault(float(share), []).append(
                auroc
            )
    out = []
    for task, lines in sorted(points.items()):
        if len({share for by_share in lines.values() for share in by_share}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        for model_id, by_share in sorted(lines.items()):
            shares = sorted(by_share)
            mean = [sum(by_share[x]) / len(by_share[x]) for x in shares]
            low = [m - min(by_share[x]) for m, x in zip(mean, shares, strict=True)]
            high = [max(by_share[x]) - m for m, x in zip(mean, shares, strict=True)]
            ax.errorbar(
                shares, mean, yerr=[low, high], marker="o", capsize=3, label=model_id.split(".", 1)[1]
            )
        ax.axhline(0.5, color="#999", linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("share of training labels kept")
        ax.set_ylabel("test AUROC (mean, range over seeds)")
        ax.legend()
        out.append((png(fig), f"Label efficiency of the models of {task} (same test rows)"))
    return out


def subgroup_figure(sub, best, png) -> tuple[str, str]:
    """Each subgroup's AUROC with its 95% bootstrap interval against the overall figure: a gap is
    only a gap where the interval leaves the line (a handful of patients gives a wide bar)."""
    sub = sub.sort_values(["kind", "subgroup"], ascending=False)
    overall = best.metrics["auroc"]["value"]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.28 * len(sub)))
    labels = [
        f"{k}: {v} (n={n:,}, {p:,} pos.)"
        for k, v, n, p in zip(sub["kind"], sub["subgroup"], sub["n"], sub["positives"], strict=True)
    ]
    low, high = sub["ci_low"].fillna(sub["value"]), sub["ci_high"].fillna(sub["value"])
    clear = (high < overall) | (low > overall)
    colours = [
        "#c44e52" if c and v < overall else "#55a868" if c else "#777"
        for c, v in zip(clear, sub["value"], strict=True)
    ]
    ax.errorbar(
        sub["value"], labels, xerr=[sub["value"] - low, high - sub["value"]], fmt="none", ecolor="#aaa"
    )
    ax.scatter(sub["value"], labels, color=colours, zorder=3)
    ax.axvline(overall, color="#333", linestyle=":")
    ax.set_xlabel("AUROC with 95% interval (dotted: overall)")
    caption = (
        f"Subgroup AUROC of {best.label} (overall {overall:.3f}); red or green only where the interval "
        f"excludes the overall figure ({int(clear.sum())} of {len(sub)} subgroups)"
    )
    return png(fig), caption


def section(lake, png) -> str:
    if not lake.exists(registry.TABLE):
        return "<h2>Models</h2><p>no models trained yet (ehrlake train)</p>"
    parts = [comparison_table(_latest(lake)), pretraining_table(_latest(lake, supervised=False))]
    curves = label_efficiency_figures(registry.versions(lake), png)
    for data, caption in figures(lake, png) + curves + saliency_maps(lake):
        parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return "".join(parts)


def saliency_maps(lake) -> list[tuple[str, str]]:
    """The Grad-CAM figure each latest image model saved beside its artifact."""
    out = []
    for m in _latest(lake):
        path = os.path.join(lake.root, m.params.get("saliency") or "")
        if m.algorithm == "cnn" and os.path.isfile(path):
            with open(path, "rb") as f:
                data = base64.b64encode(f.read()).decode()
            out.append((data, f"Grad-CAM of {m.label} on held-out images: where the CNN looked"))
    return out
