"""Point-in-time features and labels on hand-made patients: the future never leaks into features,
and each label follows its written definition."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from ehrlake import encounters, features
from ehrlake.clean.model import ENTITIES
from ehrlake.features import definitions, labels, pointintime
from ehrlake.lake import WriteMode

AS_OF = dt.date(2020, 1, 1)
T = dt.datetime.fromisoformat


def _silver(lake, entity: str, rows: list[dict], mode: WriteMode = WriteMode.OVERWRITE) -> None:
    e = ENTITIES[entity]
    full = [tuple(r.get(f.name, [] if f.name == "quality_flags" else None) for f in e.fields) for r in rows]
    lake.write(lake.spark.createDataFrame(full, e.schema()), e.table, mode=mode)


def _history(key: str, future: bool) -> dict[str, list[dict]]:
    """One patient's past (identical for both patients) and, if ``future``, a dramatic future."""
    base = {"patient_key": key, "source_system": "test", "source": "fhir"}
    enc = [
        {**base, "encounter_id": f"{key}-e1", "encounter_class": "ambulatory",
         "start_at": T("2019-06-01 09:00"), "end_at": T("2019-06-01 10:00")},
        {**base, "encounter_id": f"{key}-e2", "encounter_class": "inpatient",
         "start_at": T("2019-11-01 08:00"), "end_at": T("2019-11-05 12:00"), "length_of_stay_days": 4.2},
        # the data runs to 2021-06, so 12-month follow-up of 2020-01-01 is inside it
        {**base, "encounter_id": f"{key}-e9", "encounter_class": "wellness",
         "start_at": T("2021-06-01 09:00"), "end_at": T("2021-06-01 09:30")} if not future else None,
    ]  # fmt: skip
    cond = [{**base, "condition_id": f"{key}-c1", "encounter_id": f"{key}-e2", "code_system": "SNOMED",
             "code": "59621000", "onset_at": T("2019-11-02 00:00")}]  # fmt: skip
    obs = [{**base, "observation_id": f"{key}-o1", "code_system": "LOINC", "code": "4548-4",
            "value_number": 6.0, "effective_at": T("2019-06-01 09:30")}]  # fmt: skip
    med = [{**base, "medication_id": f"{key}-m1", "code_system": "RxNorm", "code": "197361",
            "start_at": T("2019-11-03 00:00")}]  # fmt: skip
    patient = {**base, "gender": "female", "birth_year": 1960, "state": "Kerala"}
    if future:
        enc += [
            {**base, "encounter_id": f"{key}-e3", "encounter_class": "inpatient",
             "start_at": T("2020-02-10 08:00"), "end_at": T("2020-02-20 08:00"), "length_of_stay_days": 10.0},
            {**base, "encounter_id": f"{key}-e4", "encounter_class": "emergency",
             "start_at": T("2021-06-01 08:00"), "end_at": T("2021-06-01 12:00")},
        ]  # fmt: skip
        cond.append({**base, "condition_id": f"{key}-c2", "encounter_id": f"{key}-e3", "code_system": "SNOMED",
                     "code": "44054006", "onset_at": T("2020-02-12 00:00")})  # fmt: skip
        obs.append({**base, "observation_id": f"{key}-o2", "code_system": "LOINC", "code": "4548-4",
                    "value_number": 9.5, "effective_at": T("2020-02-11 00:00")})  # fmt: skip
        med.append({**base, "medication_id": f"{key}-m2", "code_system": "RxNorm", "code": "860975",
                    "start_at": T("2020-02-12 00:00")})  # fmt: skip
        patient.update({"deceased": True, "death_date": dt.date(2020, 8, 1)})
    return {
        "patient": [patient],
        "encounter": [e for e in enc if e],
        "condition": cond,
        "observation": obs,
        "medication": med,
        "procedure": [],
    }


@pytest.fixture(scope="module")
def twins(spark, tmp_path_factory, security_conf):
    """Two patients with the same past; 'future' also has a stay, diagnosis, lab, drug and death
    after the index date."""
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    root = str(tmp_path_factory.mktemp("features") / "lake")
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    tables: dict[str, list[dict]] = {}
    for key, future in (("same", False), ("future", True)):
        for entity, rows in _history(key, future).items():
            tables.setdefault(entity, []).extend(rows)
    for entity, rows in tables.items():
        _silver(lake, entity, rows)
    return lake


def test_future_events_do_not_change_point_in_time_features(twins):
    defs = definitions.load()
    rows = {r.patient_key: r.asDict() for r in features.patient_features(twins, [AS_OF], defs).collect()}
    assert set(rows) == {"same", "future"}
    inputs = pointintime.feature_columns(defs, "patient")
    same, future = rows["same"], rows["future"]
    assert {f: same[f] for f in inputs} == {f: future[f] for f in inputs}
    # and the values are the past's: one stay and one visit ended in 2019, the 2019 HbA1c, no diabetes
    assert same["inpatient_recent"] == 1 and same["encounters_recent"] == 2
    assert same["last_hba1c"] == 6.0 and same["missing_hba1c"] == 0 and same["missing_bmi"] == 1
    assert same["has_hypertension"] == 1 and same["has_type2_diabetes"] == 0
    assert same["age_years"] == 60 and same["sex_female"] == 1 and same["medications_recent"] == 1
    assert same["inpatient_days_recent"] == pytest.approx(4.2)


def test_features_at_discharge_see_the_stay_but_not_what_follows(twins):
    defs = definitions.load()
    end = encounters.data_end(twins)
    stays = labels.readmission(twins, end).where("index_time IS NOT NULL")
    rows = {r.index_id: r for r in pointintime.build(twins, stays, defs, "encounter").collect()}
    first = rows["test/future-e2"]
    assert first.index_length_of_stay == pytest.approx(4.2) and first.index_diagnoses == 1
    # prior stays only (the index stay ends at the index time itself); the 2020 stay is later
    assert first.inpatient_recent == 0 and first.has_type2_diabetes == 0 and first.has_hypertension == 1
    second = rows["test/future-e3"]
    assert second.inpatient_recent == 1 and second.has_type2_diabetes == 1 and second.last_hba1c == 9.5


def test_labels_follow_their_definitions(twins):
    summary = features.run(twins, [AS_OF])
    got = {
        (r.task, r.patient_key, r.index_id): (r.label, r.excluded)
        for r in twins.read("gold.labels").collect()
    }
    assert got[("type2_diabetes_onset_12m", "future", "2020-01-01")] == (1, None)
    assert got[("type2_diabetes_onset_12m", "same", "2020-01-01")] == (0, None)
    assert got[("mortality_12m", "future", "2020-01-01")] == (1, None)
    assert got[("mortality_12m", "same", "2020-01-01")] == (0, None)
    assert got[("hypertension_onset_12m", "same", "2020-01-01")] == (None, "already has hypertension")
    # the 2019 stay: readmitted? no (next stay is 97 days later); the 2020 stay: died within the data
    assert got[("readmission_30d", "future", "test/future-e2")] == (0, None)
    assert got[("readmission_30d", "same", "test/same-e2")] == (0, None)
    assert summary["tasks"]["mortality_12m"] == {"labelled": 2, "positive": 1, "excluded": 0}
    # a rebuilt table's rows, as the job's summary and audit say them, are the table's
    assert summary["gold.labels"] == len(got) and summary["gold.features_patient"] == twins.row_count(
        "gold.features_patient"
    )


def test_readmission_label_counts_a_stay_within_30_days_and_excludes_deaths(spark, lake):
    base = {"patient_key": "p", "source_system": "s", "source": "fhir", "encounter_class": "inpatient"}
    stays = [
        ("a", "2020-01-01", "2020-01-05"),
        ("b", "2020-01-25", "2020-01-30"),  # 20 days after a: a is a readmission index with label 1
        ("c", "2020-04-01", "2020-04-03"),  # 62 days after b: b label 0
        ("d", "2020-12-20", "2020-12-22"),  # less than 30 days before the data end: excluded
    ]
    died = {
        **base,
        "patient_key": "q",
        "encounter_id": "q1",
        "start_at": T("2020-03-01"),
        "end_at": T("2020-03-05"),
    }  # discharged on the day of death: excluded
    _silver(lake, "encounter", [
        {**base, "encounter_id": i, "start_at": T(s), "end_at": T(e)} for i, s, e in stays
    ] + [died, {**base, "encounter_id": "z", "encounter_class": "ambulatory", "start_at": T("2021-01-10"),
          "end_at": T("2021-01-10")}])  # fmt: skip
    _silver(
        lake,
        "patient",
        [
            {"patient_key": "p", "birth_year": 1950},
            {"patient_key": "q", "birth_year": 1940, "death_date": dt.date(2020, 3, 5)},
        ],
    )
    got = {
        r.encounter_id: (r.label, r.excluded)
        for r in labels.readmission(lake, encounters.data_end(lake)).collect()
    }
    assert got["a"] == (1, None) and got["b"] == (0, None) and got["c"] == (0, None)
    assert got["q1"] == (None, "died on or before discharge")
    assert got["d"] == (None, "follow-up past the end of the data")
    # the earlier readmissions a stay's features count: only those begun before its discharge
    index = labels.readmission(lake, encounters.data_end(lake)).where("index_time IS NOT NULL")
    seen = {
        r.index_id: r.readmissions_long
        for r in pointintime.build(lake, index, definitions.load(), "encounter").collect()
    }
    # a's readmission (b) begins after a's discharge; b is one itself, known at its own discharge
    assert seen == {"s/a": 0, "s/b": 1, "s/c": 1, "s/d": 1, "s/q1": 0}


def _gold(lake) -> dict[str, list[tuple]]:
    return {t: sorted(tuple(r) for r in lake.read(t).collect()) for t in features.KEYS}


@pytest.mark.heavy
def test_incremental_features_equal_a_rebuild_also_when_the_data_end_moves(lake):
    for key, future in (("same", False), ("future", True)):
        for entity, rows in _history(key, future).items():
            _silver(lake, entity, rows, WriteMode.APPEND)
    dates = [AS_OF, dt.date(2021, 1, 1)]  # the later one's 12-month follow-up runs past the data
    assert set(features.run(lake, dates, incremental=True, rebuild_share=1.0)["how"].values()) == {
        "rebuilt"
    }  # no mark yet
    index = ("mortality_12m", "same", "2021-01-01")

    def label(index):
        return {
            (r.task, r.patient_key, r.index_id): (r.label, r.excluded)
            for r in lake.read("gold.labels").collect()
        }[index]

    assert label(index) == (None, encounters.PAST_END)
    again = features.run(lake, dates, incremental=True, rebuild_share=1.0)
    assert set(again["how"].values()) == {"merged +0 ~0 -0"}
    # a new patient whose visit in 2022 moves the data's end: the censored row of 'same' now has a label
    late = _history("late", False)
    late["encounter"].append({**late["encounter"][0], "encounter_id": "late-e10",
                              "start_at": T("2022-03-01 09:00"), "end_at": T("2022-03-01 10:00")})  # fmt: skip
    for entity, rows in late.items():
        _silver(lake, entity, rows, WriteMode.APPEND)
    merged = features.run(lake, dates, incremental=True, rebuild_share=1.0)
    assert label(index) == (0, None)
    assert (
        merged["how"]["gold.features_patient"].startswith("merged +")
        and " ~0 " not in merged["how"]["gold.labels"]
    )
    incremental = _gold(lake)
    assert set(features.run(lake, dates)["how"].values()) == {"rebuilt"}
    assert _gold(lake) == incremental


def _estimate(key: str, lab: str, at: dt.datetime, value: float, superseded: bool = False) -> tuple:
    """A row of silver.observation_estimates as the record update writes it."""
    from ehrlake import estimates

    made = dt.datetime(2024, 1, 1)
    row = {
        "estimate_id": f"{key}#{at:%Y-%m-%d}#{lab}", "patient_key": key, "code_system": "LOINC",
        "code": "39156-5", "lab": lab, "display": lab, "as_of": at, "value": value, "unit": None,
        "low": value - 1, "high": value + 1, "level": 0.8, "model_id": estimates.MODEL_ID,
        "model_version": 1, "input_versions": {}, "input_hash": 0, "source": "estimated",
        "estimated_at": made, "superseded": superseded, "superseded_at": made if superseded else None,
        "superseded_reason": "measured" if superseded else None, "gap": "missing",
    }  # fmt: skip
    return tuple(row.values())


def test_a_lab_that_opts_in_takes_an_estimate_only_where_nothing_was_measured(lake):
    """With ``estimates: true``, a row without a measurement in the window takes the latest active
    estimate up to its own date, and says so; a measurement always wins, a superseded estimate or
    one from after the row's date is never taken, and a new estimate is a change the incremental
    run recomputes its patient for. The record update's panel still reads measurements only."""
    from ehrlake import estimates
    from ehrlake.lake.provenance import ESTIMATES

    for key, future in (("same", False), ("future", True)):
        for entity, rows in _history(key, future).items():
            _silver(lake, entity, rows, WriteMode.APPEND)
    base = definitions.load()
    defs = replace(
        base, labs={n: replace(lab, estimates=n in ("bmi", "hba1c")) for n, lab in base.labs.items()}
    )
    write = lambda rows: lake.write(lake.spark.createDataFrame(rows, estimates.SCHEMA), ESTIMATES)  # noqa: E731
    write([
        _estimate("same", "bmi", T("2020-01-01 00:00"), 31.0),  # at the row's date: taken
        _estimate("same", "bmi", T("2019-03-01 00:00"), 25.0),  # older than the one above
        _estimate("same", "hba1c", T("2019-12-01 00:00"), 9.9),  # HbA1c was measured in 2019: never
        _estimate("future", "bmi", T("2019-12-01 00:00"), 28.0, superseded=True),
        _estimate("future", "bmi", T("2020-03-01 00:00"), 40.0),  # after the row's date
    ])  # fmt: skip
    features.run(lake, [AS_OF], defs=defs)

    def row(key):
        return lake.read("gold.features_patient").where(f"patient_key = '{key}'").first()

    same, future = row("same"), row("future")
    assert (same.last_bmi, same.estimated_bmi, same.missing_bmi) == (31.0, 1.0, 1.0)
    assert (same.last_hba1c, same.estimated_hba1c, same.missing_hba1c) == (6.0, 0.0, 0.0)
    assert (future.last_bmi, future.estimated_bmi, future.missing_bmi) == (None, 0.0, 1.0)
    columns = lake.read("gold.features_patient").columns
    assert "estimated_bmi" in columns and "estimated_glucose" not in columns  # glucose did not opt in

    write([_estimate("future", "bmi", T("2019-11-01 00:00"), 29.0)])
    merged = features.run(lake, [AS_OF], incremental=True, rebuild_share=1.0, defs=defs)
    assert merged["how"]["gold.features_patient"] == "merged +0 ~1 -0"
    assert (row("future").last_bmi, row("future").estimated_bmi) == (29.0, 1.0) and row("same") == same

    panel = {
        r.patient_key: r
        for r in estimates.panel(lake, lake.read("gold.features_patient"), ["bmi", "hba1c"]).collect()
    }
    assert panel["same"].last_bmi is None and panel["future"].last_bmi is None
    # the HbA1c measured 214 days before: past HbA1c's stale_days (180), so the panel's history
    same = panel["same"]
    assert (same.last_hba1c, same.prior_hba1c, same.stale_hba1c) == (None, 6.0, True)


def test_default_index_dates_leave_a_year_of_follow_up():
    assert features.default_as_of(dt.datetime(2021, 6, 1), years=3) == [
        dt.date(2018, 1, 1), dt.date(2019, 1, 1), dt.date(2020, 1, 1)
    ]  # fmt: skip


def test_only_a_lab_can_take_estimates(tmp_path):
    from ehrlake.errors import ConfigError

    path = tmp_path / "features.yaml"
    path.write_text(
        "condition_groups:\n  diabetes: {SNOMED: ['44054006'], estimates: true}\n"
        "labs:\n  bmi: {LOINC: ['39156-5'], estimates: true}\n"
    )
    with pytest.raises(ConfigError, match="condition_groups.diabetes: only a lab can take estimates"):
        definitions.load(path)
    path.write_text("labs:\n  bmi: {LOINC: ['39156-5'], estimates: true}\n")
    assert definitions.load(path).labs["bmi"].estimates and definitions.load(path).labs["bmi"].codes == {
        "LOINC": ("39156-5",)
    }


def test_a_labs_stale_days_is_its_own_and_within_the_lab_window(tmp_path):
    from ehrlake.errors import ConfigError

    path = tmp_path / "features.yaml"
    path.write_text("labs:\n  hba1c: {LOINC: ['4548-4'], stale_days: 180}\n  bmi: {LOINC: ['39156-5']}\n")
    defs = definitions.load(path)
    assert (defs.stale_days("hba1c"), defs.stale_days("bmi")) == (180, defs.windows.labs_stale_days)
    for bad, says in (
        ("labs:\n  hba1c: {LOINC: ['4548-4'], stale_days: 0}\n", "stale_days is a lab's positive number"),
        ("labs:\n  hba1c: {LOINC: ['4548-4'], stale_days: 900}\n", "past windows.labs_days \\(730\\)"),
        (
            "labs:\n  hba1c: {LOINC: ['4548-4'], stale_days: abc}\n",
            "labs.hba1c.stale_days must be int, not str",
        ),
        (
            "labs:\n  hba1c: {LOINC: ['4548-4'], stale_days: true}\n",
            "labs.hba1c.stale_days must be int, not bool",
        ),
        (
            "condition_groups:\n  ckd: {ICD10CM: ['N18'], stale_days: 90}\n",
            "condition_groups.ckd: stale_days",
        ),
    ):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=says):
            definitions.load(path)
