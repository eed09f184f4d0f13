"""Gold EDA tables on the bundled NDJSON sample: right counts where shown, nothing recoverable where hidden."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from conftest import SAMPLE
from test_suppression import _feasible_ranges

from ehrlake import clean, ingest
from ehrlake.eda import aggregates
from ehrlake.ingest import SourceKind

REFERENCE = dt.date(2026, 11, 24)


@pytest.fixture(scope="module")
def gold(spark, tmp_path_factory, security_conf):
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    root = str(tmp_path_factory.mktemp("eda") / "lake")
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(SAMPLE / "fhir_ndjson"))
    clean.run(lake, today=REFERENCE)
    summary = aggregates.run(lake, k=11, years=5, top=5, reference=REFERENCE)
    return lake, summary


def test_demographics_show_true_counts_and_hide_small_ones_safely(gold):
    lake, summary = gold
    truth = {
        (r.age_band, r.sex, r.state): r.persons
        for r in aggregates.demographics(lake, REFERENCE).collect()  # unsuppressed, never written
    }
    shown = {(r.age_band, r.sex, r.state): r for r in lake.read("gold.eda_demographics").collect()}
    assert set(shown) == set(truth) and summary["gold.eda_demographics"]["cells"] == len(truth)
    assert sum(truth.values()) == lake.read("silver.patient").where("NOT coalesce(deceased, false)").count()
    for cell, row in shown.items():
        if row.suppressed is None:
            assert row.persons == truth[cell] and (row.persons == 0 or row.persons >= 11)
        else:
            assert row.persons is None
    assert {c for c, n in truth.items() if 1 <= n < 11} <= {c for c, r in shown.items() if r.suppressed}
    hidden = {c for c, r in shown.items() if r.suppressed}
    for cell, (low, high) in _feasible_ranges(truth, hidden, 3).items():
        assert high - low >= 1, f"{cell} can be solved for"


def test_prevalence_and_utilisation_rates_are_hidden_with_their_counts(gold):
    lake, summary = gold
    for table in ("gold.eda_condition_prevalence", "gold.eda_utilisation"):
        rows = lake.read(table).collect()
        assert rows and summary[table]["cells"] == len(rows)
        for r in rows:
            if r.suppressed:
                assert r.persons is None
            else:
                assert r.persons == 0 or r.persons >= 11
    for r in lake.read("gold.eda_condition_prevalence").where("suppressed IS NOT NULL").collect():
        assert r.per_1000_seen is None
    util = lake.read("gold.eda_utilisation").collect()
    assert {r["class"] for r in util} >= {"ambulatory"} and all(
        r.encounters_per_1000 is None for r in util if r.suppressed
    )


def test_national_prevalence_is_per_1000_distinct_persons_seen_that_year(gold):
    """The national table's denominator comes from the same persisted rollup as the state table's
    (aggregates.Shared, computed once per run; conftest checks a run leaves no cached frame): the
    distinct persons with an encounter that year, not a sum over states."""
    from pyspark.sql import functions as F

    lake, _ = gold
    enc = lake.read("silver.encounter").where(F.col("start_at").isNotNull())
    seen = {
        r.year: r.n
        for r in enc.groupBy(F.year("start_at").alias("year"))
        .agg(F.countDistinct("patient_key").alias("n"))
        .collect()
    }
    table = f"gold.eda_condition_prevalence{aggregates.NATIONAL}"
    shown = [r for r in lake.read(table).collect() if r.per_1000_seen is not None]
    assert shown
    for r in shown:  # Spark rounds half up, Python half to even: within a hundredth
        assert r.per_1000_seen == pytest.approx(r.persons * 1000 / seen[r.year], abs=0.006)


def test_analysts_read_gold_and_the_reads_are_audited(gold):
    lake, _ = gold
    assert lake.read("gold.eda_demographics", role="analyst").count() > 0
    assert lake.security.audit.verify(lake).ok


def test_report_is_one_html_file_with_every_plot_rendered(gold, tmp_path):
    import base64
    import re

    from ehrlake import quality
    from ehrlake.eda import report

    lake, _ = gold
    quality.run(lake, today=REFERENCE)
    page = report.render(lake)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 6 and "not built yet" not in page and "whole country" in page
    for image in images:
        png = base64.b64decode(image)
        assert png.startswith(b"\x89PNG") and len(png) > 5_000  # a drawn plot, not an empty canvas
    assert "small cells hidden" in page and "<script" not in page  # self-contained, no scripts
    assert "This lake holds no notes" in page  # said, not left empty
    assert "No scoring run has measured drift" in page


def test_national_tables_sum_out_the_state_and_show_true_counts(gold):
    lake, summary = gold
    truth = {
        (r.age_band, r.sex): r.persons for r in aggregates.demographics(lake, REFERENCE, False).collect()
    }
    shown = {(r.age_band, r.sex): r for r in lake.read("gold.eda_demographics_national").collect()}
    assert set(shown) == set(truth) and sum(truth.values()) == sum(
        r.persons for r in aggregates.demographics(lake, REFERENCE).collect()
    )
    assert any(r.suppressed is None and r.persons >= 11 for r in shown.values())  # something to draw
    for cell, row in shown.items():
        assert row.persons == (None if row.suppressed else truth[cell])
    diseases = {r.display for r in lake.read("gold.eda_condition_prevalence_national").collect()}
    assert diseases and not any(d.endswith(("(finding)", "(situation)")) for d in diseases if d)


def test_hidden_cells_are_drawn_as_gaps_and_marks_never_as_zero():
    import math

    import pandas as pd

    from ehrlake.eda import report

    prev = pd.DataFrame(
        {
            "year": [2020, 2021, 2022],
            "display": ["Asthma"] * 3,
            "persons": [40, None, 55],
            "suppressed": [None, "primary", None],
        }
    )
    fig, caption = report.trends(prev)
    ys = list(fig.axes[0].lines[0].get_ydata())
    assert ys[0] == 40 and math.isnan(ys[1]) and ys[2] == 55 and "1 small cells hidden" in caption
    demo = pd.DataFrame(
        {
            "age_band": ["0-4", "0-4", "5-14", "5-14"],
            "sex": ["male", "female", "male", "female"],
            "persons": [30, None, 25, 20],
            "suppressed": [None, "primary", None, None],
        }
    )
    fig, caption = report.pyramid(demo)
    assert [t.get_text().strip() for t in fig.axes[0].texts] == ["female: hidden"]
    survey = pd.DataFrame(
        {
            "state": ["Bihar", "Bihar"],
            "sex": ["male", "female"],
            "indicator": ["overweight_or_obese"] * 2,
            "nfhs5_percent": [14.7, 15.9],
            "lake_percent": [86.2, None],
            "suppressed": [None, "primary"],
        }
    )
    fig, caption = report.nfhs5_comparison(survey)
    lake_bars = [b.get_width() for b in fig.axes[0].containers[1]]
    assert lake_bars == [0, 86.2] and [t.get_text() for t in fig.axes[0].texts] == ["lake: hidden"]
    assert "1 small cells hidden" in caption


def test_the_configured_small_cell_k_applies_without_being_passed(spark, tmp_path, security_conf):
    """``security.small_cell_k`` is the one place the threshold is set: a stricter deployment (here
    40) hides every count under it in every EDA table without a ``--k``."""
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    security = config.load(security_conf).security
    strict = dataclasses.replace(security, small_cell_k=40)
    root = str(tmp_path / "lake")
    lake = Lake(root, spark, security=Security.from_config(strict, root))
    assert lake.security.small_cell_k == 40
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(SAMPLE / "fhir_ndjson"))
    clean.run(lake, today=REFERENCE)
    aggregates.run(lake, years=5, top=5, reference=REFERENCE)
    truth = {
        (r.age_band, r.sex): r.persons for r in aggregates.demographics(lake, REFERENCE, False).collect()
    }
    shown = {(r.age_band, r.sex): r for r in lake.read("gold.eda_demographics_national").collect()}
    assert all(r.persons in (0, None) or r.persons >= 40 for r in shown.values())
    between = [c for c, n in truth.items() if 11 <= n < 40]  # shown under the default k, hidden here
    assert between and all(shown[c].suppressed for c in between)


@pytest.mark.slow
def test_analyst_notebook_runs_headless_against_the_lake(gold, tmp_path):
    import os

    import nbformat
    from conftest import REPO
    from nbclient import NotebookClient

    lake, _ = gold
    notebook = nbformat.read(REPO / "notebooks" / "analyst.ipynb", as_version=4)
    plot = tmp_path / "trend.png"
    os.environ.update(EHRLAKE_LAKE=lake.root, EHRLAKE_PLOT=str(plot))
    try:
        NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        os.environ.pop("EHRLAKE_LAKE"), os.environ.pop("EHRLAKE_PLOT")
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
    assert "patient_key" in text and "family_name" not in text and "cells suppressed" in text
    assert plot.stat().st_size > 5_000


def test_indian_population_is_compared_with_nfhs5_state_indicators(lake, tmp_path):
    from fhir_fixtures import patient, write_ndjson
    from test_clean import quantity

    home = [{"city": "Mysuru", "state": "Karnataka", "country": "IN"}]
    women = [patient(f"w{i}", address=home) for i in range(24)]  # born 1970
    bmi = [quantity(f"b{i}", f"w{i}", "39156-5", 27.0 if i < 12 else 22.0, "kg/m2") for i in range(24)]
    write_ndjson(tmp_path / "in" / "all.ndjson", [*women, *bmi])
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"))
    clean.run(lake, today=REFERENCE)
    summary = aggregates.run(lake, reference=REFERENCE)
    rows = lake.read("gold.eda_nfhs5_comparison").collect()
    assert summary["gold.eda_nfhs5_comparison"]["cells"] == len(rows) == 1
    row = rows[0]
    assert (row.state, row.sex, row.indicator) == ("Karnataka", "female", "overweight_or_obese")
    assert (row.persons_measured, row.persons_meeting, row.lake_percent) == (24, 12, 50.0)
    assert (row.nfhs5_percent, row.difference) == (30.1, 19.9)  # NFHS-5 Karnataka, women, indicator 88


def test_readmission_by_facility_hides_small_stays_and_small_numerators(gold):
    lake, summary = gold
    rows = lake.read("gold.eda_readmission_by_facility").collect()
    assert rows and summary["gold.eda_readmission_by_facility"]["cells"] == len(rows)
    stays = lake.read("silver.encounter").where("encounter_class = 'inpatient'").count()
    assert stays > 0
    for r in rows:
        if r.suppressed:
            assert r.stays is None and r.readmission_30d_rate is None
        else:
            assert r.stays == 0 or r.stays >= 11
            if r.readmission_30d_rate is not None and r.stays:
                readmissions = round(r.readmission_30d_rate * r.stays)
                assert readmissions == 0 or readmissions >= 11


def test_published_readmission_rates_are_the_labels_mean_over_the_stays_it_judges(gold):
    """One definition (encounters.py): a facility's published rate is the ``readmission_30d``
    label's mean over its stays the label does not exclude, so an overlapping stay or a transfer
    is no readmission and a stay whose 30 days run past the data's end does not lower the rate."""
    from pyspark.sql import functions as F

    from ehrlake import encounters
    from ehrlake.features import labels

    lake, _ = gold
    end = encounters.data_end(lake)
    label = labels.readmission(lake, end)
    stays = lake.read("silver.encounter").select(
        "source_system",
        "encounter_id",
        F.year("start_at").alias("year"),
        F.coalesce("organization_id", F.lit(aggregates.UNKNOWN)).alias("facility"),
    )
    expected = {
        (r.year, r.facility): r.rate
        for r in label.join(stays, ["source_system", "encounter_id"])
        .groupBy("year", "facility")
        .agg(F.round(F.avg("label"), 4).alias("rate"))
        .collect()
    }
    # unsuppressed (k = 1): the sample's published cells are all too small to show a rate
    rows = aggregates.readmission_by_facility(lake, years=300, last_year=2300, end=end, k=1).collect()
    published = [r for r in rows if r.readmission_30d_rate is not None]
    assert published
    for r in published:
        assert r.readmission_30d_rate == expected[(r.year, r.facility)], (r.year, r.facility)


def test_the_full_grid_has_every_combination_with_zero_where_none_came(spark):
    """Suppression must see the zeros a published table shows: a year x state cell no record fell
    into is a row with count 0 (its other figures missing), of the aggregate's own column types."""
    counts = spark.createDataFrame(
        [(2020, "Goa", 12, 1.5), (2021, "Kerala", 3, None), (2021, "Goa", 0, 2.0)],
        "year int, state string, persons long, mean_stay double",
    )
    grid = aggregates._full_grid(counts, ["year", "state"], "persons")
    assert [(f.name, f.dataType.simpleString()) for f in grid.schema.fields] == [
        ("year", "int"), ("state", "string"), ("persons", "bigint"), ("mean_stay", "double")
    ]  # fmt: skip
    rows = {(r.year, r.state): (r.persons, r.mean_stay) for r in grid.collect()}
    assert rows == {
        (2020, "Goa"): (12, 1.5), (2020, "Kerala"): (0, None),
        (2021, "Goa"): (0, 2.0), (2021, "Kerala"): (3, None),
    }  # fmt: skip
