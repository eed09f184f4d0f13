"""Progress hierarchies (lib/ehrlake/hierarchy.py): a programme's tree on patient x as-of feature rows,
its nodes in words, leaves of at least k patients, and rules that are the tree's own decisions."""

from __future__ import annotations

import datetime as dt
from html import escape

import numpy as np
import pytest

from ehrlake import hierarchy
from ehrlake.errors import EhrlakeError

K = 11


def _features(spark, patients: int = 130, years=(2019, 2020, 2021)):
    """gold.features_patient rows of diabetic patients whose HbA1c level is their own (plus noise):
    the outcome a year on (HbA1c >= 8 or a stay) follows it, so the tree should split on HbA1c.
    Every tenth patient has no HbA1c on record; some are not in the cohort at all."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(patients):
        level, age, female = rng.uniform(5.5, 10.5), int(rng.integers(35, 85)), int(i % 2)
        for year in years:
            hba1c = None if i % 10 == 0 else round(float(level + rng.normal(0, 0.3)), 1)
            rows.append(
                {
                    "patient_key": f"p{i:03d}", "index_id": str(year), "index_time": dt.datetime(year, 1, 1),
                    "sex": "female" if female else "male", "age_band": "40-64" if age < 65 else "65+",
                    "state": "Kerala", "race": None, "age_years": age + year - 2019, "sex_female": female,
                    "has_diabetes": int(i % 13 != 0), "last_hba1c": hba1c, "missing_hba1c": int(hba1c is None),
                    "last_bmi": round(float(rng.normal(28, 4)), 1), "missing_bmi": 0,
                    "last_systolic_bp": float(round(rng.normal(130, 12))), "missing_systolic_bp": 0,
                    "last_total_cholesterol": None, "missing_total_cholesterol": 1,
                    "last_egfr": float(round(rng.normal(80, 15))), "missing_egfr": 0,
                    "days_since_last_encounter": int(rng.integers(10, 400)), "encounters_recent": int(rng.integers(0, 6)),
                    "medications_active": int(rng.integers(0, 5)), "inpatient_long": 0,
                    "inpatient_recent": int(rng.random() < 0.03), "has_hypertension": int(rng.random() < 0.4),
                    "has_ckd": 0, "has_coronary_disease": 0, "has_obesity": 0,
                }
            )  # fmt: skip
    schema = (
        "patient_key string, index_id string, index_time timestamp, sex string, age_band string, "
        "state string, race string, age_years int, sex_female int, has_diabetes int, last_hba1c double, "
        "missing_hba1c int, last_bmi double, missing_bmi int, last_systolic_bp double, "
        "missing_systolic_bp int, last_total_cholesterol double, missing_total_cholesterol int, "
        "last_egfr double, missing_egfr int, days_since_last_encounter int, encounters_recent int, "
        "medications_active int, inpatient_long int, inpatient_recent int, has_hypertension int, "
        "has_ckd int, has_coronary_disease int, has_obesity int"
    )
    return spark.createDataFrame([tuple(r[f.split()[0]] for f in schema.split(", ")) for r in rows], schema)


@pytest.fixture
def built(lake):
    lake.write(_features(lake.spark), hierarchy.FEATURES)
    settings = hierarchy.load()
    return lake, settings, hierarchy.build(lake, "diabetes", settings=settings)


def test_a_programmes_rows_take_their_outcome_from_the_next_as_of(lake):
    """A cohort row's label is the outcome on the same patient's row a year on; the last year has
    none yet, and a row whose next year cannot decide it (no HbA1c and no stay) is left out."""
    features = _features(lake.spark)
    lake.write(features, hierarchy.FEATURES)
    rows = hierarchy.programme_rows(lake, hierarchy.load().programme("diabetes"))
    got = {
        (r.patient_key, r.index_id): r.label
        for r in rows.select("patient_key", "index_id", "label").collect()
    }
    expected = {}
    for r in features.collect():
        if r.index_id == "2019":
            continue
        decided = r.last_hba1c is not None or r.inpatient_recent > 0
        cohort = int(r.patient_key[1:]) % 13 != 0  # every 13th patient is not diabetic
        if decided and cohort:
            expected[(r.patient_key, str(int(r.index_id) - 1))] = int(
                (r.last_hba1c or 0) >= 8.0 or r.inpatient_recent > 0
            )
    assert got == expected and 200 < len(got) < 240 and 0 < sum(got.values()) < len(got)


def test_the_tree_has_leaves_of_k_patients_and_rules_that_are_its_decisions(built, capsys):
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.regression import DecisionTreeRegressionModel
    from pyspark.sql import functions as F

    lake, settings, mv = built
    nodes = {r.node_id: r for r in lake.read(hierarchy.NODES).where("programme = 'diabetes'").collect()}
    leaves = [n for n in nodes.values() if n.leaf]
    assert len(leaves) >= 2 and all(n.patients is not None and n.patients >= K for n in leaves)
    assert all(n.parent_id in nodes for n in nodes.values() if n.node_id != 1)
    root = nodes[1]
    assert root.rule == "everyone in the programme" and root.split.startswith("haemoglobin A1c (%) > ")
    assert 7.0 <= float(root.split.rsplit(" ", 1)[1]) <= 9.0  # near the planted 8 (Spark bins thresholds)
    assert all(nodes[n.parent_id].rule in n.rule or n.parent_id == 1 for n in nodes.values() if n.parent_id)

    # every fitted row's leaf by the rules in SQL scores what the saved tree predicts
    p = settings.programme("diabetes")
    rows = hierarchy.programme_rows(lake, p)
    names = mv.features
    fill = {k: float(v) for k, v in mv.params["fill"].items()}
    prepared = hierarchy.filled(rows, names, fill)
    model = DecisionTreeRegressionModel.load(mv.artifact_path(lake))
    tree = hierarchy.nodes(model, names)  # as the model weighs its rows (classes balanced)
    scored = model.transform(VectorAssembler(inputCols=names, outputCol="_features").transform(prepared))
    probability = {n.node_id: n.probability for n in tree}
    pairs = scored.select(hierarchy.leaf_of(tree).alias("leaf"), F.col("prediction")).collect()
    assert all(abs(probability[r.leaf] - r.prediction) < 1e-9 for r in pairs)
    # and the risks the hierarchy states are the outcome rates of the rows, not the weighted ones
    risk = {n.node_id: n.probability for n in hierarchy.nodes(model, names, mv.params["positive_weight"])}
    assert mv.params["positive_weight"] != 1 and all(
        abs(risk[n.node_id] - n.outcome_rate) < 1e-9 for n in leaves
    )
    # registered and evaluated on test patients like any model: the planted signal is found
    assert mv.model_id == "hierarchy.diabetes" and mv.metrics["auroc"]["value"] > 0.8

    from ehrlake import cli

    assert cli.main(["hierarchy", "show", "--programme", "diabetes", "--lake", lake.root]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("diabetes care: hierarchy.diabetes v1, test AUROC ")
    assert shown[2].startswith(f"+ everyone in the programme: {root.patients:,} patients, outcome ")
    assert len(shown) == 2 + len(nodes) and any(
        line.lstrip().startswith("- haemoglobin A1c") for line in shown
    )


def test_a_rare_outcome_still_gives_groups_on_both_sides_of_its_rate(spark):
    """An outcome in one row of six: 4% below x = 0.5; above it 20% or 40% by y. Unweighted, every
    group predicts "no" and Spark's classification tree merges them into one leaf (SPARK-3159); a
    balanced classification tree still merges the 20% and 40% groups, both above the population's
    rate. The hierarchy's tree (regression, balanced) keeps the three groups apart, and each leaf
    states its rows' own outcome rate."""
    from pyspark.sql import functions as F

    rng = np.random.default_rng(11)
    x, y = rng.uniform(0, 1, 4000), rng.uniform(0, 1, 4000)
    rate = np.where(x < 0.5, 0.04, np.where(y < 0.5, 0.20, 0.40))
    label = (rng.uniform(0, 1, 4000) < rate).astype(int)
    rows = spark.createDataFrame(
        [(f"p{i}", float(a), float(b), int(c)) for i, (a, b, c) in enumerate(zip(x, y, label, strict=True))],
        f"{hierarchy.PERSON} string, x double, y double, label int",
    )
    settings = hierarchy.Settings(max_depth=2, min_leaf_patients=K, seed=42, programmes={}, words={})
    _, tree, _, weight = hierarchy.fit(rows, ["x", "y"], settings, "rare")
    node = {n.node_id: n for n in tree}
    assert node[1].split[0] == "x" and abs(node[1].split[1] - 0.5) < 0.05
    assert node[3].split[0] == "y" and abs(node[3].split[1] - 0.5) < 0.05 and node[6].leaf and node[7].leaf
    assert abs(weight - (len(label) - label.sum()) / label.sum()) < 1e-9
    rates = {
        r["leaf"]: r["rate"]
        for r in rows.groupBy(hierarchy.leaf_of(tree).alias("leaf"))
        .agg(F.avg("label").alias("rate"))
        .collect()
    }
    leaves = [n for n in tree if n.leaf]
    assert all(abs(n.probability - rates[n.node_id]) < 1e-9 for n in leaves)
    assert max(rates.get(2, 0), rates.get(4, 0), rates.get(5, 0)) < 0.07 < 0.15 < rates[6] < 0.3 < rates[7]


def test_rules_read_in_words_and_a_programme_needs_its_outcome(lake):
    words = hierarchy.describer(hierarchy.load())
    assert words("has_ckd", ">", 0.5) == "chronic kidney disease"
    assert words("has_ckd", "<=", 0.5) == "no chronic kidney disease"
    assert words("missing_hba1c", ">", 0.5) == "no haemoglobin A1c (%) in 2 years"
    assert words("age_years", "<=", 64.5) == "age (years) <= 64.5"
    diabetes = hierarchy.load().programme("diabetes")  # care lowers BMI, never raises it
    assert hierarchy.movable(diabetes, "last_bmi", "<=") and not hierarchy.movable(diabetes, "last_bmi", ">")
    assert hierarchy.movable(diabetes, "missing_hba1c", "<=") and not hierarchy.movable(
        diabetes, "age_years", "<="
    )
    calm = "(last_hba1c < 8.0 OR last_hba1c IS NULL) AND inpatient_recent = 0"
    lake.write(_features(lake.spark).where(calm), hierarchy.FEATURES)
    with pytest.raises(Exception, match="need 22 and both outcomes"):
        hierarchy.build(lake, "diabetes")
    from ehrlake.eda import report  # the report still has the section, naming what has no tree

    html = report.hierarchy_section(lake)
    assert "<h2>Patient progress hierarchies</h2>" in html and "<pre>" not in html
    # the refusal is recorded for the programme, and the report gives its reason
    (last,) = lake.read(hierarchy.BUILDS).collect()
    assert (last.programme, last.status, last.model_id) == ("diabetes", "refused", None)
    assert "need 22 and both outcomes" in last.reason and escape(last.reason) in html
    assert "<li>diabetes care: the latest build (" in html
    assert (
        "<li>hypertension care: no build yet" in html
        and "<li>chronic kidney disease care: no build yet" in html
    )
    with pytest.raises(
        EhrlakeError, match=r"no tree of diabetes: its latest build \(.*\) made no tree: .*need 22"
    ):
        hierarchy.show(lake, "diabetes")
    with pytest.raises(EhrlakeError, match="no tree of ckd yet: run ehrlake hierarchy build --programme ckd"):
        hierarchy.show(lake, "ckd")


def test_every_cohort_row_is_placed_and_its_move_is_named_by_risk_band(built):
    """gold.patient_progress: each cohort patient at each as-of (the latest too) in a leaf, with the
    previous node and the move between bands; a later year's records never move a past node; the
    yearly moves between bands are counted with small counts hidden."""
    lake, settings, mv = built
    rows = {(r.patient_key, r.as_of.year): r for r in lake.read(hierarchy.PROGRESS).collect()}
    leaves = {r.node_id for r in lake.read(hierarchy.NODES).where("leaf").collect()}
    assert len(rows) == 120 * 3 and {r.node for r in rows.values()} <= leaves
    order = hierarchy.BAND_ORDER
    for (key, year), r in rows.items():
        if year == 2019:
            assert r.transition == "first" and r.previous_node is None
            continue
        before = rows[(key, year - 1)]
        assert (r.previous_node, r.previous_band) == (before.node, before.risk_band)
        moved = order[r.risk_band] - order[before.risk_band]
        assert r.transition == ("improved" if moved < 0 else "worsened" if moved > 0 else "stable")
    assert {r.transition for r in rows.values()} >= {"first", "stable"}

    # the past stays where it was when a year is taken away: nodes depend on each row's own features
    p = settings.programme("diabetes")
    tree = hierarchy.load_tree(lake, mv)
    fill = {k: float(v) for k, v in mv.params["fill"].items()}
    from ehrlake.lake import WriteMode

    kept = lake.read(hierarchy.FEATURES).where("index_id <> '2021'")
    lake.write(kept, hierarchy.FEATURES, mode=WriteMode.OVERWRITE)
    earlier = hierarchy.progress(
        hierarchy.placed(lake, p, tree, mv.features, fill), p, tree, mv.bands
    ).collect()
    assert len(earlier) == 120 * 2 and all(
        rows[(r.patient_key, r.as_of.year)].node == r.node for r in earlier
    )

    moves = lake.read(hierarchy.TRANSITIONS).collect()
    assert {m.year for m in moves} == {2020, 2021}
    assert all(m.patients is None or m.patients >= K for m in moves) and any(m.patients for m in moves)

    # the report shows the tree and the moves, hidden cells counted and never drawn
    from ehrlake.eda import report

    html = report.hierarchy_section(lake)
    hidden = sum(m.patients is None for m in moves)
    assert "diabetes care: hierarchy.diabetes v1" in html and "+ everyone in the programme: " in html
    assert html.count("<img") == 1 and f"{hidden} small cells hidden, left out" in html
    assert "diabetes: what would move people" in html and "<td>change</td>" in html
    assert "<li>hypertension care: no build yet" in html and "<li>diabetes care" not in html
    builds = {r.programme: r for r in lake.read(hierarchy.BUILDS).collect()}
    assert (builds["diabetes"].status, builds["diabetes"].version, builds["diabetes"].reason) == (
        "built",
        1,
        None,
    )


def assert_counts_people_per_area(lake, areas, person_of) -> None:
    """gold.improvement_summary against the improvement rows counted by hand: each person's latest
    row, under each change it names (or its status), hidden below k."""
    latest = {}
    for r in sorted(areas, key=lambda r: (r.as_of, r.patient_key)):
        latest[person_of(r)] = r
    expected = {}
    for r in latest.values():
        for area in [c.change for c in r.changes] if r.changes else [r.status]:
            expected[area] = expected.get(area, 0) + 1
    table = {r.area: r for r in lake.read(hierarchy.IMPROVEMENT_SUMMARY).collect()}
    assert set(table) == set(expected) and any(r.kind == "change" for r in table.values())
    for area, n in expected.items():
        shown = table[area]
        assert (shown.patients, shown.share) == ((n, round(n / len(latest), 3)) if n >= K else (None, None))


def _meets(row: dict, conditions) -> bool:
    return all(row[f] <= t if op == "<=" else row[f] > t for f, op, t in conditions)


def test_improvement_areas_change_modifiable_features_only_and_land_in_a_lower_risk_leaf(built):
    """gold.improvement_areas, checked against a brute-force search over the leaves: the nearest
    lower-risk leaf whose unchangeable conditions the row already meets; applying the changes puts
    the row in that leaf; where no such leaf exists, no target and a status saying why."""
    lake, settings, mv = built
    p = settings.programme("diabetes")
    tree = hierarchy.load_tree(lake, mv)
    leaves = [n for n in tree if n.leaf]
    fill = {k: float(v) for k, v in mv.params["fill"].items()}
    scale = {k: float(v) for k, v in mv.params["scales"].items()}
    rows = {
        (r.patient_key, r.index_time): r.asDict()
        for r in hierarchy.placed(lake, p, tree, mv.features, fill).collect()
    }
    got = lake.read(hierarchy.IMPROVEMENT).collect()
    assert len(got) == len(rows) == lake.read(hierarchy.PROGRESS).count()
    fixed = {"age_years", "sex_female", "inpatient_long"} | {c for c in mv.features if c.startswith("has_")}
    for r in got:
        x = rows[(r.patient_key, r.as_of)]
        risk = next(n.probability for n in leaves if n.node_id == x["node"])
        options = []
        for t in leaves:
            unchangeable = [c for c in t.conditions if not hierarchy.movable(p, c[0], c[1])]
            if t.probability < risk and _meets(x, unchangeable):
                unmet = [c for c in t.conditions if c not in unchangeable and not _meets(x, [c])]
                gap = sum(abs(x[f] - th) / scale[f] for f, _, th in unmet)
                options.append((gap, len(unmet), t.probability, t.node_id, unmet))
        if not options:
            assert r.target_node is None and r.changes is None and r.status != "lower risk within reach"
            continue
        best = min(options)
        assert (r.target_node, r.status) == (best[3], "lower risk within reach") and r.target_risk < r.risk
        assert abs(r.distance - best[0]) < 1e-9 and r.summary == "; ".join(c.change for c in r.changes)
        assert all(c.feature not in fixed for c in r.changes) and len(r.changes) == best[1]
        ways = {"<=": ("down", "any"), ">": ("up", "any")}
        assert all(
            p.modifiable[c.feature] in ways[c.op] for c in r.changes if not c.feature.startswith("missing_")
        )
        changed = dict(x)
        for c in r.changes:  # just across each threshold, the way the rule needs it
            changed[c.feature] = c.threshold if c.op == "<=" else c.threshold + 1e-6
        assert [n.node_id for n in leaves if _meets(changed, n.conditions)] == [r.target_node]
    statuses = {r.status for r in got}
    assert "lower risk within reach" in statuses and len(statuses) >= 2
    assert any("haemoglobin A1c" in r.summary for r in got if r.summary)

    # gold.improvement_summary: people at their latest date per change (or status), hidden below k
    assert_counts_people_per_area(lake, got, lambda r: r.patient_key)


def test_generated_copies_count_as_the_patient_they_copy(lake):
    """Leaves of k patients mean k people: forty generated copies of one training patient are that
    one patient in every node's count (the split keeps them with their template)."""
    from pyspark.sql import functions as F

    from ehrlake.clean import origin
    from ehrlake.models.train import split

    features = _features(lake.spark)
    p = hierarchy.load().programme("diabetes")
    lake.write(features, hierarchy.FEATURES)
    train, _ = split(hierarchy.programme_rows(lake, p), 42)
    template = sorted(r.patient_key for r in train.select("patient_key").distinct().collect())[0]
    copies = [f"g{i:03d}" for i in range(40)]
    one = features.where(F.col("patient_key") == template)
    for key in copies:
        lake.write(one.withColumn("patient_key", F.lit(key)), hierarchy.FEATURES)
    lake.write(
        lake.spark.createDataFrame(
            [(key, template) for key in copies], "patient_key string, template_key string"
        ),
        origin.TABLE,
    )
    mv = hierarchy.build(lake, "diabetes")
    rows = hierarchy.with_people(lake, hierarchy.programme_rows(lake, p))
    fitted, _ = split(rows, 42)
    people, keys = fitted.agg(F.countDistinct(hierarchy.PERSON), F.countDistinct("patient_key")).first()
    root = lake.read(hierarchy.NODES).where("node_id = 1").first()
    assert keys == people + 40 and root.patients == people and mv.params["train_patients"] == people

    # the moves between bands and the areas for improvement count people too
    progress = hierarchy.with_people(lake, lake.read(hierarchy.PROGRESS))
    expected = {
        (r.year, r.previous_band, r.risk_band): (r.people, r.keys)
        for r in progress.where("previous_band IS NOT NULL")
        .groupBy(F.year("as_of").alias("year"), "previous_band", "risk_band")
        .agg(F.countDistinct(hierarchy.PERSON).alias("people"), F.countDistinct("patient_key").alias("keys"))
        .collect()
    }
    moves = {
        (m.year, m.previous_band, m.risk_band): m.patients for m in lake.read(hierarchy.TRANSITIONS).collect()
    }
    assert moves == {cell: people if people >= K else None for cell, (people, _) in expected.items()}
    assert any(keys == people + 40 for people, keys in expected.values())
    template_of = {r.patient_key: r.template_key for r in lake.read(origin.TABLE).collect()}
    assert_counts_people_per_area(
        lake,
        lake.read(hierarchy.IMPROVEMENT).collect(),
        lambda r: template_of.get(r.patient_key, r.patient_key),
    )
