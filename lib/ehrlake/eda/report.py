"""``ehrlake report``: one self-contained HTML file (plots inlined as PNG) from the gold tables.

Only gold (already suppressed) tables are read, so the report can leave the platform as it is. A
hidden cell is never drawn as a number: a hidden bar is left out and marked "hidden", a hidden point
of a trend is a gap in its line, and each caption counts them. Country-wide figures come from the
national tables (suppressed on their own), not from adding up state cells. The gold tables are small
by construction (bounded by their dimensions), so they are brought to the driver as pandas.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ehrlake.eda.aggregates import AGE_BANDS  # noqa: E402

AGE_ORDER = [f"{lo}+" if hi >= 200 else f"{lo}-{hi}" for lo, hi in AGE_BANDS]


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _figure(fig, caption: str) -> str:
    """A plot inlined as PNG with its caption (the caption is its alt text too)."""
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{_png(fig)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _hidden(df: pd.DataFrame) -> int:
    return int(df["suppressed"].notna().sum()) if "suppressed" in df else 0


def pyramid(demo: pd.DataFrame):
    """Persons by age band and sex, the whole country (``gold.eda_demographics_national``)."""
    bands = [a for a in AGE_ORDER if a in set(demo["age_band"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    for sex, side, colour in (("male", -1, "#4c72b0"), ("female", 1, "#dd8452")):
        cells = demo[demo["sex"] == sex].set_index("age_band").reindex(bands)
        ax.barh(bands, side * cells["persons"].fillna(0), color=colour, label=sex)
        for band in cells.index[cells["persons"].isna()]:
            ax.text(0, band, f"{sex}: hidden ", ha="right" if side < 0 else "left", va="center", fontsize=7)
    ax.axvline(0, color="#333", linewidth=0.5)
    ax.set_xlabel("persons (male left, female right)")
    ax.legend()
    return fig, f"Population pyramid, whole country ({_hidden(demo)} small cells hidden, marked)"


def trends(prev: pd.DataFrame):
    """The top diseases' persons per year, the whole country; a hidden year is a gap, not a zero."""
    data = prev.sort_values("year")
    top = data.groupby("display")["persons"].sum().nlargest(6).index
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in top:
        series = data[data["display"] == name]
        ax.plot(series["year"], series["persons"].astype(float), marker="o", label=str(name)[:40])
    ax.set_xlabel("year")
    ax.set_ylabel("persons with the condition")
    ax.legend(fontsize=7)
    return fig, f"Top diseases by year, whole country ({_hidden(prev)} small cells hidden: gaps in the lines)"


def utilisation(util: pd.DataFrame):
    data = (
        util.fillna({"encounters_per_1000": 0}).groupby("class")["encounters_per_1000"].mean().sort_values()
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(data.index, data.values, color="#55a868")
    ax.set_xlabel("encounters per 1,000 persons seen (mean over years and regions)")
    return fig, f"Utilisation by encounter class ({_hidden(util)} small cells hidden)"


def readiness_heatmap(ready: pd.DataFrame):
    parts = ["completeness", "conformance", "plausibility", "timeliness", "duplication", "linkage"]
    labels = [f"{r.level}: {r.name}" for r in ready.itertuples()]
    values = ready[parts].astype(float).to_numpy()
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(len(labels), 1)))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(parts)), parts, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if pd.isna(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax)
    return fig, "Readiness components per source and region (score = weighted mean x 100)"


def missingness(dq: pd.DataFrame):
    data = dq[dq["category"] == "completeness"].groupby("check_id")["failed_share"].max().sort_values()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.3 * max(len(data), 1)))
    ax.barh(data.index, data.values * 100, color="#c44e52")
    ax.set_xlabel("% of rows missing the field (worst source)")
    return fig, "Missingness of key fields (completeness checks)"


def nfhs5_comparison(cmp: pd.DataFrame):
    """The lake's share of persons meeting each NFHS-5 indicator beside the survey's, per state and
    sex (``gold.eda_nfhs5_comparison``); a hidden cell is listed as hidden, never drawn."""
    data = cmp.sort_values(["indicator", "state", "sex"])
    labels = [f"{r.state}, {r.sex}: {str(r.indicator).replace('_', ' ')}" for r in data.itertuples()]
    y = range(len(labels))
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.32 * max(len(labels), 1)))
    ax.barh(
        [i + 0.2 for i in y],
        data["nfhs5_percent"].astype(float),
        height=0.4,
        color="#8172b3",
        label="NFHS-5 (survey)",
    )
    shown = data["lake_percent"].astype(float)
    ax.barh([i - 0.2 for i in y], shown.fillna(0), height=0.4, color="#4c72b0", label="lake")
    for i, value in enumerate(shown):
        if pd.isna(value) or value == 0:
            ax.text(0.5, i - 0.2, "lake: hidden" if pd.isna(value) else "lake: 0%", va="center", fontsize=7)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of persons measured")
    ax.legend(fontsize=7)
    return fig, (
        f"The lake beside NFHS-5 (2019-21), per state and sex ({_hidden(cmp)} small cells hidden); "
        "generated patients carry the sample's clinical values, so the gaps show the data, not India"
    )


def transitions(moves: pd.DataFrame, programme: str):
    """Patients moving between risk bands a year on, per year (``gold.hierarchy_transitions``):
    one stacked segment per previous band -> band; a hidden cell (fewer than k) is left out."""
    from ehrlake.hierarchy import BAND_ORDER

    colours = {"improved": "#55a868", "stable": "#8c8c8c", "worsened": "#c44e52"}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    shown = moves[moves["patients"].notna()].copy()
    step = shown["risk_band"].map(BAND_ORDER) - shown["previous_band"].map(BAND_ORDER)
    shown["move"] = ["improved" if d < 0 else "worsened" if d > 0 else "stable" for d in step]
    years = sorted(moves["year"].unique())
    bottom = {y: 0.0 for y in years}
    for (before, after, move), cells in shown.groupby(["previous_band", "risk_band", "move"]):
        counts = cells.set_index("year")["patients"].reindex(years).fillna(0)
        ax.bar([str(y) for y in years], counts, bottom=[bottom[y] for y in years], color=colours[move],
               edgecolor="white", label=f"{before} -> {after}")  # fmt: skip
        for y, n in counts.items():
            if n:
                ax.text(str(y), bottom[y] + n / 2, f"{before}->{after}", ha="center", va="center", fontsize=6)
            bottom[y] += n
    ax.set_ylabel("patients")
    hidden = int(moves["patients"].isna().sum())
    return fig, (
        f"{programme}: patients by risk band now against a year before (green improved, grey stable, "
        f"red worsened; {hidden} small cells hidden, left out)"
    )


def improvement_table(areas: pd.DataFrame, programme: str, top: int = 8) -> str:
    """The areas for improvement that would move the most people (``gold.improvement_summary``),
    with how many areas hold too few people to show."""
    shown = areas[areas["patients"].notna()].sort_values(["patients", "area"], ascending=[False, True])
    hidden = int(areas["patients"].isna().sum())
    table = shown.head(top)[["area", "kind", "patients", "share"]].astype({"patients": int})
    return (
        f"<p>{html.escape(programme)}: what would move people, at their latest date, to a lower-risk "
        f"group (a change to a feature care can move), or why nothing would ({hidden} areas of fewer "
        f"than k people hidden)</p>" + table.to_html(index=False, border=0)
    )


def hierarchy_section(lake) -> str:
    """Each programme's tree as text, its moves between risk bands and its areas for improvement
    (docs/hierarchy.md); a programme without a tree is named, not left out."""
    from ehrlake import hierarchy

    settings = hierarchy.load()
    built = (
        [r.programme for r in lake.read(hierarchy.NODES).select("programme").distinct().collect()]
        if lake.exists(hierarchy.NODES)
        else []
    )
    parts = ["<h2>Patient progress hierarchies</h2>"]
    moves = lake.read(hierarchy.TRANSITIONS).toPandas() if lake.exists(hierarchy.TRANSITIONS) else None
    areas = (
        lake.read(hierarchy.IMPROVEMENT_SUMMARY).toPandas()
        if lake.exists(hierarchy.IMPROVEMENT_SUMMARY)
        else None
    )
    for name in sorted(p for p in built if p in settings.programmes):
        parts.append(f"<h3>{html.escape(settings.programmes[name].description)}</h3>")
        parts.append(f"<pre>{html.escape(hierarchy.show(lake, name, settings=settings))}</pre>")
        own = moves[moves["programme"] == name] if moves is not None else None
        if own is not None and not own.empty:
            fig, caption = transitions(own, name)
            parts.append(_figure(fig, caption))
        own = areas[areas["programme"] == name] if areas is not None else None
        if own is not None and not own.empty:
            parts.append(improvement_table(own, name))
    latest = (
        {r.programme: r for r in lake.read(hierarchy.BUILDS).collect()}  # one row per programme
        if lake.exists(hierarchy.BUILDS)
        else {}
    )
    refused = []
    for name, p in settings.programmes.items():
        last = latest.get(name)
        if last is not None and last.status == "refused":
            note = f"the {hierarchy.refusal(last)}" + ("; an earlier tree is shown" if name in built else "")
            refused.append(f"<li>{html.escape(p.description)}: {html.escape(note)}</li>")
        elif name not in built:
            refused.append(
                f"<li>{html.escape(p.description)}: no build yet (<code>ehrlake hierarchy build</code>)</li>"
            )
    if refused:
        parts.append(
            "<p>Programmes without a tree (a tree needs twice k training patients whose outcome a "
            f"year on is known, with both outcomes):</p><ul>{''.join(refused)}</ul>"
        )
    return "".join(parts)


def notes_section(lake) -> str:
    """Clinical notes: volume per document type and the concepts most often found, with their
    negated share (``gold.eda_notes``, ``gold.eda_note_concepts``; small cells hidden)."""
    parts = ["<h2>Clinical notes</h2>"]
    if not lake.exists("silver.note"):
        return parts[0] + (
            "<p>This lake holds no notes: none of its sources carried FHIR DocumentReference or "
            "Composition records (docs/notes.md).</p>"
        )
    for table, caption in (
        ("gold.eda_notes", "notes per document type, the patients they are about and those without text"),
        ("gold.eda_note_concepts", "concepts most often found in notes, and the share of mentions negated"),
    ):
        if not lake.exists(table):
            parts.append(f"<p>{html.escape(table)}: not built yet (ehrlake eda)</p>")
            continue
        frame = lake.read(table).toPandas()
        hidden = _hidden(frame)
        shown = frame[frame["suppressed"].isna()].drop(columns=["suppressed"])
        counts = [c for c in ("patients", "notes", "without_text", "mentions") if c in shown.columns]
        shown = shown.sort_values("patients", ascending=False, kind="stable").astype(
            dict.fromkeys(counts, int)
        )
        parts.append(
            f"<p>{html.escape(caption)} ({hidden} rows of fewer than k patients hidden)</p>"
            + shown.to_html(index=False, border=0)
        )
    return "".join(parts)


def drift_section(lake) -> str:
    """Per task and model, the latest scored date's drift against the training snapshot: the
    score's PSI and the inputs past each threshold (``gold.model_drift``, docs/features.md)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from ehrlake.scoring import drift

    head = "<h2>Model drift</h2>"
    if not lake.exists(drift.TABLE):
        return head + (
            "<p>No scoring run has measured drift in this lake yet: each full <code>ehrlake score</code> "
            "run compares the scored population with the model's training snapshot.</p>"
        )
    model = ["task", "model_id", "model_version"]
    latest = F.max("as_of").over(Window.partitionBy(*model))
    rows = (
        lake.read(drift.TABLE)
        .withColumn("_latest", latest)
        .where(F.col("as_of") == F.col("_latest"))
        .groupBy(*model, "as_of")
        .agg(
            F.max(F.when(F.col("input") == drift.SCORE, F.col("psi"))).alias("score_psi"),
            F.count(F.when(F.col("input") != drift.SCORE, 1)).alias("inputs"),
            F.sort_array(F.collect_list(F.when(F.col("status") == "moderate", F.col("input")))).alias(
                "moderate"
            ),
            F.sort_array(F.collect_list(F.when(F.col("status") == "shifted", F.col("input")))).alias(
                "shifted"
            ),
        )
        .orderBy(*model)
        .toPandas()  # one row per task and model version
    )
    rows["model"] = rows["model_id"] + " v" + rows["model_version"].astype(str)
    for column in ("moderate", "shifted"):
        rows[column] = rows[column].map(lambda names: ", ".join(names) or "none")
    rows["score_psi"] = rows["score_psi"].round(3)
    table = rows[["task", "model", "as_of", "score_psi", "inputs", "moderate", "shifted"]]
    return head + (
        f"<p>Population stability index against each model's training snapshot, latest scored date "
        f"(moderate above {drift.MODERATE}, shifted above {drift.SHIFTED}: a population the model "
        "was not built for)</p>" + table.to_html(index=False, border=0)
    )


def review_section(lake) -> str:
    """The clinician review loop: open cases per task, and how often clinicians overrode each
    model's call, by risk band (``gold.review_queue`` / ``gold.review_decisions``)."""
    from ehrlake import review

    head = "<h2>Clinician review</h2>"
    if not lake.exists(review.QUEUE):
        return head + "<p>No cases queued yet: each <code>ehrlake score</code> run queues them.</p>"
    queue = (
        lake.read(review.QUEUE).groupBy("task", "status").count().orderBy("task", "status").collect()
    )  # one row per task and status
    counts = "; ".join(f"{r.task}: {r['count']:,} {r.status}" for r in queue)
    rates = review.override_rates(lake)
    if not rates:
        return (
            head
            + f"<p>Cases: {html.escape(counts)}. No decision yet (<code>ehrlake review decide</code>).</p>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(r.model_id)} v{r.model_version}</td><td>{html.escape(r.risk_band or '')}</td>"
        f"<td>{html.escape(r.rule or '')}</td>"
        f"<td>{r.decided:,}</td><td>{r.overridden:,}</td><td>{r.override_rate:.0%}</td></tr>"
        for r in rates
    )
    return head + (
        f"<p>Cases: {html.escape(counts)}. Decisions per model and band, and the share in which the "
        "clinician overrode the model's call (a high share in a band: the model is not trusted "
        "there; <code>train --with-feedback</code> learns from the reviewed labels).</p>"
        "<table><tr><th>model</th><th>band</th><th>rule</th><th>decided</th><th>overridden</th>"
        f"<th>override rate</th></tr>{rows}</table>"
    )


def planning_section(lake) -> str:
    """The demand forecast per unit with its interval, its backtest against the baselines, and the
    latest allocation plans (``gold.utilisation_forecast``, ``gold.forecast_backtest``,
    ``gold.allocation_plan``; docs/planning.md)."""
    from pyspark.sql import functions as F

    from ehrlake.planning import allocate, forecast

    head = "<h2>Resource planning</h2>"
    if not lake.exists(forecast.FORECAST):
        return head + "<p>No forecast yet: <code>ehrlake forecast</code>, then <code>ehrlake plan</code>.</p>"
    parts = [head]
    ahead = lake.read(forecast.FORECAST).toPandas()  # units x horizon weeks per resource
    resources = sorted(ahead["resource"].unique())
    fig, axes = plt.subplots(1, len(resources), figsize=(3.2 * len(resources), 3), squeeze=False)
    for ax, name in zip(axes[0], resources, strict=True):
        own = ahead[ahead["resource"] == name]
        top = own.groupby("unit")["forecast"].sum().nlargest(4).index
        for unit in top:
            u = own[own["unit"] == unit].sort_values("week_start")
            ax.plot(u["week_start"], u["forecast"], marker=".", label=str(unit)[:18])
            ax.fill_between(u["week_start"], u["lower"], u["upper"], alpha=0.15)
        ax.set_title(f"{name} by {own['level'].iloc[0]}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.legend(fontsize=6)
    level = f"{ahead['interval'].iloc[0]:.0%}"
    after = ahead["trained_through"].max()
    caption = f"Weekly demand forecast, largest units, with {level} intervals (weeks after {after})"
    parts.append(_figure(fig, caption))
    if lake.exists(forecast.BACKTEST):
        bt = lake.read(forecast.BACKTEST).where("horizon = 0").toPandas()  # 3 rows per resource
        wide = bt.pivot_table(index=["resource", "level", "units", "backtest_weeks"], columns="method",
                              values="mape").reset_index()  # fmt: skip
        wide.columns.name = None
        wide = wide.rename(columns={m: f"MAPE {m}" for m in bt["method"].unique()})
        cover = bt[bt["method"] == forecast.MODEL].set_index("resource")["coverage"]
        wide["interval coverage"] = wide["resource"].map(cover)
        for c in wide.columns[4:]:
            wide[c] = wide[c].map(lambda v: "" if pd.isna(v) else f"{v:.0%}")
        parts.append(
            "<p>Backtest: mean absolute percentage error over the held-out weeks with demand, forecast "
            "from every held-out week 1 to 8 weeks ahead, against the same week a year earlier (seasonal "
            "naive) and the mean of the last four weeks.</p>" + wide.to_html(index=False, border=0)
        )
    if lake.exists(allocate.TABLE):
        plan = lake.read(allocate.TABLE).orderBy("resource", F.desc("allocated"), "unit").toPandas()
        shown = plan[["resource", "unit", "capacity", "allocated", "expected_demand",
                      "expected_unmet_before", "expected_unmet_after"]].round(2)  # fmt: skip
        parts.append(
            "<p>Allocation plans (<code>ehrlake plan</code>): the pool placed where it minimises the "
            "expected unmet demand per week over the forecast weeks.</p>"
            + shown.to_html(index=False, border=0)
        )
    return "".join(parts)


def render(lake, title: str = "ehrlake population health report") -> str:
    """The report as one HTML string (see module docstring)."""
    sections = []
    inputs = {
        "gold.eda_demographics_national": pyramid,
        "gold.eda_condition_prevalence_national": trends,
        "gold.eda_utilisation": utilisation,
        "gold.eda_nfhs5_comparison": nfhs5_comparison,
        "gold.readiness": readiness_heatmap,
        "gold.dq_results": missingness,
    }
    for table, plot in inputs.items():
        if not lake.exists(table):
            sections.append(f"<h2>{html.escape(table)}</h2><p>not built yet</p>")
            continue
        frame = lake.read(table).toPandas()
        if table == "gold.dq_results" and not frame.empty:
            frame = frame[frame["run_id"] == frame["run_id"].max()]
        fig, caption = plot(frame)
        sections.append(_figure(fig, caption))
    from ehrlake.models import report as models_report

    sections.append(models_report.section(lake, _png))
    sections.append(drift_section(lake))
    sections.append(review_section(lake))
    sections.append(planning_section(lake))
    sections.append(hierarchy_section(lake))
    sections.append(notes_section(lake))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:60em;margin:auto}}"
        "figure{margin:2em 0}figcaption{color:#555}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Lake {html.escape(lake.root)}, {stamp}. Counts under the "
        "suppression threshold are hidden together with complementary cells (docs/security.md).</p>"
        + "".join(sections)
        + "</body></html>"
    )
