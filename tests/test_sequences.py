"""Patient event sequences (gold.sequences): point in time, the vocabulary's rare-code rule, the cut to
the most recent tokens, and a rerun that gives the same tables."""

from __future__ import annotations

import datetime as dt

import pytest
from test_features import AS_OF, T, _history, _silver

from ehrlake import features
from ehrlake.features import sequences
from ehrlake.features.sequences import Settings

INDEX_TIME = dt.datetime(2020, 1, 1)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory, security_conf):
    """The features' twins (one past, one also with a future), each with a type 2 diabetes code of
    its own ICD-10 subcategory in 2019: rare apart, common as their category E11."""
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    root = str(tmp_path_factory.mktemp("sequences") / "lake")
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    tables: dict[str, list[dict]] = {}
    for key, future, icd in (("same", False, "E11.9"), ("future", True, "E11.65")):
        history = _history(key, future)
        history["condition"].append(
            {"patient_key": key, "source_system": "test", "source": "fhir", "condition_id": f"{key}-icd",
             "code_system": "ICD10CM", "code": icd, "onset_at": T("2019-12-01 00:00")}
        )  # fmt: skip
        for entity, rows in history.items():
            tables.setdefault(entity, []).extend(rows)
    for entity, rows in tables.items():
        _silver(lake, entity, rows)
    return lake


def _sequences(lake, settings: Settings) -> dict[tuple[str, str], dict]:
    vocab = sequences.vocabulary(lake, settings)
    tokens = {r.id: r.token for r in vocab.collect()}
    index = lake.spark.createDataFrame(
        [(k, i, t) for k in ("same", "future") for i, t in (("2020", INDEX_TIME), ("all", T("2030-01-01")))],
        "patient_key string, index_id string, index_time timestamp",
    )
    out = {}
    for row in sequences.build(lake, index, vocab, settings).collect():
        d = row.asDict()
        d["tokens"] = [tokens[i] for i in d["token_ids"]]
        out[(row.patient_key, row.index_id)] = d
    return out


def test_a_sequence_holds_only_what_happened_before_its_index_time(lake):
    got = _sequences(lake, Settings(min_patients=1, lab_bins=2))
    same, future = got[("same", "2020")], got[("future", "2020")]
    # the twins' pasts differ only in the ICD subcategory of their last token
    for column in ("token_ids", "ages", "days_before_index", "gaps"):
        assert same[column][:-1] == future[column][:-1], column
    assert same["tokens"][-1] == "condition:ICD10CM:E11.9" and same["length"] == future["length"] == 6
    assert same["ages"][-1] == future["ages"][-1] and same["gaps"][-1] == future["gaps"][-1]
    # oldest first; one token per event; the HbA1c of 6.0 in the lower half of the lab's values
    assert future["tokens"] == [
        "lab:LOINC:4548-4:q1",  # 09:30
        "encounter:ambulatory",  # ended 10:00
        "condition:SNOMED:59621000",
        "medication:RxNorm:197361",
        "encounter:inpatient",  # ended 2019-11-05 12:00
        "condition:ICD10CM:E11.65",
    ]
    assert future["ages"] == [59] * 6 and future["gaps"] == [0, 0, 153, 1, 2, 25]
    assert future["days_before_index"] == [213, 213, 60, 59, 56, 31] and future["truncated"] is False
    # the whole record: the future's later stay, diagnosis, high HbA1c and drug come after
    whole = got[("future", "all")]["tokens"]
    assert whole[:6] == future["tokens"]
    assert {"lab:LOINC:4548-4:q2", "condition:SNOMED:44054006", "medication:RxNorm:860975"} <= set(whole[6:])
    assert got[("same", "all")]["length"] < got[("future", "all")]["length"]


def test_rare_codes_become_their_category_or_their_kinds_unknown_token(lake):
    got = _sequences(lake, Settings(min_patients=2, lab_bins=2, parents={"ICD10CM": 3}))
    # E11.9 and E11.65 have one patient each; their category E11 has two
    assert (
        got[("same", "2020")]["tokens"][-1]
        == got[("future", "2020")]["tokens"][-1]
        == "condition:ICD10CM:E11"
    )
    future = got[("future", "all")]["tokens"]
    # what only the future patient has is no token of its own
    assert "condition:?" in future and "medication:?" in future and "encounter:?" in future
    assert not any(t.endswith(("44054006", "860975", "emergency")) for t in future)
    vocab = {r.token: r for r in sequences.vocabulary(lake, Settings(min_patients=2, lab_bins=2)).collect()}
    assert [vocab[t].id for t in sequences.SPECIAL] == [0, 1, 2, 3]
    assert all(r.patients is None or r.patients >= 2 for r in vocab.values())


def test_only_the_most_recent_tokens_are_kept(lake):
    full = _sequences(lake, Settings(min_patients=1))[("future", "all")]
    cut = _sequences(lake, Settings(min_patients=1, max_length=3))[("future", "all")]
    assert cut["truncated"] is True and cut["length"] == 3 and full["length"] > 3
    assert cut["token_ids"] == full["token_ids"][-3:] and cut["gaps"][1:] == full["gaps"][-2:]


def test_the_job_writes_vocabulary_and_sequences_and_a_rerun_gives_the_same_tables(lake):
    features.run(lake, [AS_OF])
    settings = Settings(min_patients=1, lab_bins=2)
    first = sequences.run(lake, settings=settings)
    # per patient: 2020-01-01 and all; per inpatient stay: at its discharge (same: 1, future: 2)
    assert first["patients"] == 2 and first["sequences"] == 7
    rows = lambda t: sorted(map(str, lake.read(t).drop("vocabulary_version").collect()))  # noqa: E731
    before = {t: rows(t) for t in (sequences.VOCABULARY, sequences.SEQUENCES)}
    fingerprint = sequences.vocabulary_fingerprint(lake)
    again = sequences.run(lake, settings=settings)
    assert {t: rows(t) for t in before} == before
    assert again["vocabulary_version"] == first["vocabulary_version"] + 1
    # a pretrained encoder still fits: the same tokens under the same ids, whatever the version
    assert sequences.vocabulary_fingerprint(lake) == fingerprint
    assert sequences.vocabulary_fingerprint(lake, first["vocabulary_version"]) == fingerprint
    assert {r.vocabulary_version for r in lake.read(sequences.SEQUENCES).collect()} == {
        again["vocabulary_version"]
    }
    rows = {(r.patient_key, r.index_id): r for r in lake.read(sequences.SEQUENCES).collect()}
    assert {i for _, i in rows} == {"2020-01-01", "all", "test/same-e2", "test/future-e2", "test/future-e3"}
    # at the 2020 stay's discharge: its diagnosis and drug are in, the 2021 emergency visit is not
    tokens = {r.id: r.token for r in lake.read(sequences.VOCABULARY).collect()}
    stay = [tokens[i] for i in rows[("future", "test/future-e3")].token_ids]
    assert stay[-3:] == ["lab:LOINC:4548-4:q2", "condition:SNOMED:44054006", "medication:RxNorm:860975"]
    assert "encounter:emergency" not in stay and "encounter:emergency" in [
        tokens[i] for i in rows[("future", "all")].token_ids
    ]
    sequences.run(lake, settings=Settings(min_patients=2, lab_bins=2))  # codes of one patient go
    assert sequences.vocabulary_fingerprint(lake) != fingerprint


def test_a_date_shifted_extract_alone_is_on_its_own_clock(lake, tmp_path):
    """MIMIC-IV's dates are shifted into 2110-2201, so clean flags every event ``future_date``. In a
    lake beside other sources those events lie past the data's end and stay out; in a lake of the
    extract alone its clock is the only one: the data's end is its latest encounter, and its
    events make sequences (they made none, and its stays no labels, before)."""
    from ehrlake.encounters import data_clock
    from ehrlake.lake import Lake

    assert data_clock(lake) == (T("2021-06-01 09:00"), False)  # the twins: a real clock
    shifted = Lake(str(tmp_path / "shifted"), lake.spark, security=lake.security)
    years = dt.timedelta(days=365 * 150)
    for entity, rows in _history("mimic", future=True).items():
        moved = [
            {k: v + years if isinstance(v, dt.datetime) else v for k, v in r.items()}
            | {"quality_flags": ["future_date"]}
            for r in rows
        ]
        _silver(shifted, entity, moved)
    assert data_clock(shifted) == (T("2021-06-01 08:00") + years, True)
    index = lake.spark.createDataFrame(
        [("mimic", "all", T("2021-06-02 08:00") + years)],
        "patient_key string, index_id string, index_time timestamp",
    )
    settings = Settings(min_patients=1, lab_bins=2)
    (row,) = sequences.build(shifted, index, sequences.vocabulary(shifted, settings), settings).collect()
    assert row.length == 10  # every event of the shifted record: 4 stays, 2 diagnoses, 2 labs, 2 drugs
