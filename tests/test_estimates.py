"""Record update (lib/ehrlake/estimates.py): an MLP per lab estimates missing values from the rest
of the panel, with 80% conformal intervals, beside the observations and never over them; a re-run
touches only the rows whose inputs changed and leaves what a rebuild would."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import numpy as np
import pytest
from pyspark.sql import functions as F

from ehrlake import estimates
from ehrlake.features import definitions
from ehrlake.lake import WriteMode

LABS = list(definitions.load().labs)


def _panel(spark, patients: int = 260, seed: int = 3):
    """Feature rows whose labs hang together the way the body's do: diastolic follows systolic,
    HbA1c follows glucose, eGFR falls as creatinine rises; a quarter of each is missing."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(patients):
        level = rng.normal(0, 1)  # the patient's own tendency
        for year in (2020, 2021):
            sbp = 130 + 15 * level + rng.normal(0, 5)
            glucose = 110 + 25 * level + rng.normal(0, 8)
            creat = float(np.exp(0.1 + 0.25 * level + rng.normal(0, 0.05)))
            values = {
                "systolic_bp": sbp, "diastolic_bp": 0.6 * sbp + rng.normal(0, 3), "glucose": glucose,
                "hba1c": 3.0 + glucose / 40 + rng.normal(0, 0.2), "creatinine": creat,
                "egfr": 100 / creat + rng.normal(0, 4), "bmi": 27 + 3 * level + rng.normal(0, 1),
            }  # fmt: skip
            row = {"patient_key": f"p{i:03d}", "index_id": str(year), "index_time": dt.datetime(year, 1, 1),
                   "age_years": float(40 + i % 40), "sex_female": float(i % 2), "has_diabetes": float(level > 1)}  # fmt: skip
            for lab in LABS:
                v = values.get(lab)
                row[f"last_{lab}"] = None if v is None or rng.random() < 0.25 else round(float(v), 2)
            rows.append(row)
    columns = ["patient_key", "index_id", "index_time", "age_years", "sex_female", "has_diabetes",
               *[f"last_{lab}" for lab in LABS]]  # fmt: skip
    schema = ", ".join(
        f"{c} {'string' if c in ('patient_key', 'index_id') else 'timestamp' if c == 'index_time' else 'double'}"
        for c in columns
    )
    return spark.createDataFrame([tuple(r[c] for c in columns) for r in rows], schema)


@pytest.fixture
def estimated(lake):
    lake.write(_panel(lake.spark), estimates.FEATURES, mode=WriteMode.OVERWRITE)
    report = estimates.run(lake)
    return lake, report


def _active(lake):
    return {
        (r.patient_key, r.as_of, r.lab): r
        for r in lake.read(estimates.TABLE).where(~F.col("superseded")).collect()
    }


def test_estimates_fill_gaps_only_with_intervals_and_provenance(estimated):
    lake, report = estimated
    features = {(r.patient_key, r.index_time): r.asDict() for r in lake.read(estimates.FEATURES).collect()}
    active = _active(lake)
    modelled = {"systolic_bp", "diastolic_bp", "glucose", "hba1c", "creatinine", "egfr", "bmi"}
    gaps = {(k[0], k[1], lab) for k, r in features.items() for lab in modelled if r[f"last_{lab}"] is None}
    assert set(active) == gaps and report["estimates_written"] == len(gaps)  # every gap, nothing else
    for r in active.values():
        assert r.low < r.value < r.high and r.source == "estimated" and r.level == 0.8
        assert r.model_id == estimates.MODEL_ID and r.input_versions[estimates.FEATURES] >= 0
        assert r.gap == "missing"  # the fixture's panel holds no observations: nothing is stale
    units = {r.lab: r.unit for r in active.values()}
    assert units["systolic_bp"] == "mm[Hg]" and units["hba1c"] == "%" and active[next(iter(active))].code

    # the observations are read as they are, the estimates beside them with their provenance
    lake.write(
        lake.spark.createDataFrame(
            [("o1", "p001", "LOINC", "4548-4", 6.1, "%", dt.datetime(2019, 6, 1))],
            "observation_id string, patient_key string, code_system string, code string, value_number double, "
            "unit string, effective_at timestamp",
        ),
        estimates.OBSERVATIONS,
    )
    both = lake.read("silver.observation", include_estimates=True)
    counted = {r.provenance: r.n for r in both.groupBy("provenance").agg(F.count("*").alias("n")).collect()}
    assert counted == {"observed": 1, "estimated": len(active)}
    assert lake.read("silver.observation").count() == 1
    with pytest.raises(Exception, match="include_estimates is for silver.observation"):
        lake.read("silver.patient", include_estimates=True)


def test_the_mlp_learns_the_panel_and_its_intervals_cover_about_80_percent(lake):
    """On rows the model never saw (other patients), hidden values are estimated far better than
    by the mean, and about 8 in 10 fall inside the stated 80% interval."""
    panel = _panel(lake.spark, patients=400, seed=11).toPandas()
    seen = panel[panel["patient_key"] < "p300"]
    unseen = panel[panel["patient_key"] >= "p300"].copy()
    model = estimates.fit(seen, LABS, seed=1)
    errors, inside, total = [], 0, 0
    for lab in ("hba1c", "diastolic_bp", "egfr"):
        truth = unseen[f"last_{lab}"].copy()
        hidden = unseen.assign(**{f"last_{lab}": np.nan})
        got = model.estimate(hidden.assign(input_hash=0))
        got = got[got["lab"] == lab].set_index(["patient_key", "as_of"])
        keyed = unseen.set_index(["patient_key", "index_time"])[f"last_{lab}"]
        pairs = [(got.loc[k], keyed.loc[k]) for k in got.index if not np.isnan(keyed.loc[k])]
        err = np.array([e["value"] - t for e, t in pairs])
        errors.append(np.sqrt(np.mean(err**2)) / np.nanstd(truth))
        inside += sum(e["low"] <= t <= e["high"] for e, t in pairs)
        total += len(pairs)
    assert max(errors) < 0.6, errors  # the mean's normalised RMSE is 1
    assert 0.7 <= inside / total <= 0.9, inside / total


def test_a_rerun_estimates_only_changed_rows_and_equals_a_rebuild(estimated):
    """A lab measured since (p005's HbA1c in 2021), a row changed (p007's age in 2020), a row gone
    (p009 in 2021): the re-run estimates those rows only, supersedes their old estimates with the
    reason, and leaves the same active estimates as a run from scratch with the same model."""
    lake, _ = estimated
    before = _active(lake)
    rows = lake.read(estimates.FEATURES)
    t2021, t2020 = dt.datetime(2021, 1, 1), dt.datetime(2020, 1, 1)
    assert ("p005", t2021, "hba1c") in before or ("p005", t2020, "hba1c") in before
    gap_year = t2021 if ("p005", t2021, "hba1c") in before else t2020
    changed = (
        rows.withColumn(
            "last_hba1c",
            F.when(
                (F.col("patient_key") == "p005") & (F.col("index_time") == gap_year), F.lit(6.4)
            ).otherwise(F.col("last_hba1c")),
        )
        .withColumn(
            "age_years",
            F.when((F.col("patient_key") == "p007") & (F.col("index_time") == t2020), F.lit(77.0)).otherwise(
                F.col("age_years")
            ),
        )
        .where(~((F.col("patient_key") == "p009") & (F.col("index_time") == t2021)))
    )
    frozen = lake.spark.createDataFrame(changed.collect(), changed.schema)  # read before it is overwritten
    lake.write(frozen, estimates.FEATURES, mode=WriteMode.OVERWRITE)
    report = estimates.run(lake)
    modelled = {k[2] for k in before}
    now = {(r.patient_key, r.index_time): r.asDict() for r in lake.read(estimates.FEATURES).collect()}
    with_gaps = {
        k for k in [("p005", gap_year), ("p007", t2020)] if any(now[k][f"last_{m}"] is None for m in modelled)
    }
    assert report["rows_estimated"] == len(with_gaps)
    superseded = {
        (r.patient_key, r.as_of, r.lab): r.superseded_reason
        for r in lake.read(estimates.TABLE).where("superseded").collect()
    }
    assert superseded[("p005", gap_year, "hba1c")] == "measured"
    assert all(superseded[k] == "inputs changed" for k in before if k[:2] == ("p007", t2020))
    assert all(superseded[k] == "row gone" for k in before if k[:2] == ("p009", t2021))
    untouched = {k for k in before if k[:2] not in {("p005", gap_year), ("p007", t2020), ("p009", t2021)}}
    after = _active(lake)
    assert all(after[k].estimate_id == before[k].estimate_id for k in untouched)  # kept, not redone

    # the same model from scratch gives the same active estimates
    incremental = {k: round(r.value, 9) for k, r in after.items()}
    lake.write(lake.read(estimates.TABLE).limit(0), estimates.TABLE, mode=WriteMode.OVERWRITE)
    assert estimates.run(lake)["patients_read"] is None  # emptied by another hand: every patient is read
    assert {k: round(r.value, 9) for k, r in _active(lake).items()} == incremental
    again = estimates.run(lake)  # and a re-run with nothing new reads no patient and writes nothing
    assert again["estimates_written"] == 0 and again["patients_read"] == 0


def test_a_rerun_reads_only_the_patients_whose_rows_changed(estimated):
    """A new patient's feature rows appended: the re-run reads that patient alone (the changed data
    files of the Delta log since its last run), estimates their gaps and keeps every other estimate."""
    lake, first = estimated
    assert first["patients_read"] is None  # the first run reads everyone
    before = _active(lake)
    new = _panel(lake.spark, patients=1, seed=5).withColumn("patient_key", F.lit("q001"))
    lake.write(new.withColumn("last_hba1c", F.lit(None).cast("double")), estimates.FEATURES)  # appended
    report = estimates.run(lake)
    assert report["patients_read"] == 1
    after = _active(lake)
    added = set(after) - set(before)
    assert {k[0] for k in added} == {"q001"} and {k[1].year for k in added if k[2] == "hba1c"} == {2020, 2021}
    assert all(after[k].estimate_id == before[k].estimate_id for k in before)  # nothing else redone


def test_history_is_the_measurement_before_the_one_a_panel_holds(lake):
    """Where the lab is in the panel's window, its history is the measurement before the latest;
    where it is not, the latest of all (older than the window), each with its age in days."""
    obs = [
        ("h1", "p1", "LOINC", "4548-4", 9.0, dt.datetime(2015, 6, 1)),
        ("h2", "p1", "LOINC", "4548-4", 7.0, dt.datetime(2019, 6, 1)),
        ("h3", "p1", "LOINC", "4548-4", 6.5, dt.datetime(2020, 6, 1)),
        ("h4", "p1", "LOINC", "4548-4", 5.0, dt.datetime(2022, 6, 1)),  # after both anchors: never seen
    ]
    lake.write(
        lake.spark.createDataFrame(
            [(*o, [], "%") for o in obs],
            "observation_id string, patient_key string, code_system string, code string, value_number double, "
            "effective_at timestamp, quality_flags array<string>, unit string",
        ),
        estimates.OBSERVATIONS,
    )
    anchors = lake.spark.createDataFrame(
        [("p1", dt.datetime(2020, 9, 1)), ("p1", dt.datetime(2018, 1, 1)), ("p2", dt.datetime(2021, 1, 1))],
        "patient_key string, index_time timestamp",
    )
    got = {(r.patient_key, r.index_time.year): r for r in estimates.history(lake, anchors, LABS).collect()}
    assert (got[("p1", 2020)].prior_hba1c, round(got[("p1", 2020)].prior_days_hba1c)) == (7.0, 458)
    assert (got[("p1", 2018)].prior_hba1c, round(got[("p1", 2018)].prior_days_hba1c)) == (9.0, 945)
    assert got[("p2", 2021)].prior_hba1c is None and got[("p1", 2020)].prior_bmi is None
    # stale: the latest is in the window but older than the lab's stale_days (HbA1c: 180): it is the
    # history itself; where the lab sets none, windows.labs_stale_days (365) holds
    assert not got[("p1", 2020)].stale_hba1c and not got[("p1", 2018)].stale_hba1c  # fresh; out of window
    late = anchors.where("index_time = '2020-09-01'").selectExpr(
        "patient_key", "timestamp'2021-01-01' AS index_time"
    )
    row = {r.patient_key: r for r in estimates.history(lake, late, LABS).collect()}["p1"]
    assert (row.prior_hba1c, round(row.prior_days_hba1c), row.stale_hba1c) == (6.5, 214, True)
    defs = definitions.load()
    defs = replace(defs, labs={**defs.labs, "hba1c": replace(defs.labs["hba1c"], stale_days=None)})
    row = {r.patient_key: r for r in estimates.history(lake, late, LABS, defs).collect()}["p1"]
    assert (row.prior_hba1c, round(row.prior_days_hba1c), row.stale_hba1c) == (7.0, 580, False)


def test_a_stale_value_is_estimated_anew_and_a_recent_one_is_not(lake):
    """p005's HbA1c in its 2020 row was measured 15 months before (stale: over 365 days), p006's 4
    months before: the record update estimates p005's current HbA1c from the rest of the panel and
    the old value, leaves p006's alone, and the observation itself stays as it was."""
    panel = _panel(lake.spark)
    at_2020 = F.col("index_time") == F.lit(dt.datetime(2020, 1, 1))
    for key, value in (("p005", 7.7), ("p006", 6.1)):
        chosen = (F.col("patient_key") == key) & at_2020
        panel = panel.withColumn("last_hba1c", F.when(chosen, F.lit(value)).otherwise(F.col("last_hba1c")))
    lake.write(panel, estimates.FEATURES, mode=WriteMode.OVERWRITE)
    observed = lake.spark.createDataFrame(
        [("o5", "p005", "LOINC", "4548-4", 7.7, dt.datetime(2018, 10, 1), [], "%"),
         ("o6", "p006", "LOINC", "4548-4", 6.1, dt.datetime(2019, 9, 1), [], "%")],
        "observation_id string, patient_key string, code_system string, code string, value_number double, "
        "effective_at timestamp, quality_flags array<string>, unit string",
    )  # fmt: skip
    lake.write(observed, estimates.OBSERVATIONS)
    report = estimates.run(lake)
    hba1c = {(r.patient_key, r.as_of.year): r for r in _active(lake).values() if r.lab == "hba1c"}
    stale = hba1c[("p005", 2020)]
    assert stale.low < stale.value < stale.high and ("p006", 2020) not in hba1c and stale.gap == "stale"
    stale_rows = [r for r in _active(lake).values() if r.gap == "stale"]
    assert report["estimates_of_stale_values"] == len(stale_rows) >= 1
    assert {r.gap for k, r in hba1c.items() if k[0] not in ("p005", "p006")} == {"missing"}  # no HbA1c seen
    assert sorted(map(str, lake.read(estimates.OBSERVATIONS).collect())) == sorted(
        map(str, observed.collect())
    )
