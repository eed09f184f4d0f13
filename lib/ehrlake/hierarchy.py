"""Patient progress hierarchies: per care programme, a decision tree whose nodes are named groups.

A programme (``conf/hierarchy.yaml``: diabetes, hypertension, CKD) follows a cohort of the
point-in-time feature rows (``gold.features_patient``, patient x as-of date) and an outcome seen on
the same patient's row at the next as-of date. A depth-limited Spark ML decision tree is fitted on
those rows, every leaf holding at least ``min_leaf_patients`` patients (refitted with larger leaves
until it does: rows are patient x date, so a leaf of enough rows may hold too few patients). Its
nodes are written to ``gold.hierarchy_nodes`` with the rule that leads to each in words, the
patients and outcome rate (hidden below k) and a risk band; the tree is a registered model
(``hierarchy.<programme>``) evaluated like any other on the patient split's test rows. Every cohort
row is placed in its leaf (``gold.patient_progress``: node, risk, the previous node and whether the
patient improved, worsened or stayed by risk band), and the moves between bands are counted per
year (``gold.hierarchy_transitions``, small counts hidden). Every row also gets its area for
improvement (``gold.improvement_areas``: the nearest lower-risk leaf that care can reach), and the
people at their latest as-of are counted by each change that would move them
(``gold.improvement_summary``, small counts hidden): what an analyst or the report reads. Counts are
of people: a generated copy counts as the sample patient it copies.

The rules are read from the fitted tree itself (its root node through Spark's JVM API) and applied
as SQL, so a node's rule in words is the tree's decision: a test checks every row's leaf by rule
against the model's own prediction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from ehrlake.clean.codes import lookup
from ehrlake.config import read_yaml
from ehrlake.errors import AccessDenied, ConfigError, EhrlakeError, JobRunning
from ehrlake.features import definitions
from ehrlake.home import CONF

HIERARCHY_FILE = CONF / "hierarchy.yaml"
NODES = "gold.hierarchy_nodes"
PROGRESS = "gold.patient_progress"
TRANSITIONS = "gold.hierarchy_transitions"
IMPROVEMENT = "gold.improvement_areas"
IMPROVEMENT_SUMMARY = "gold.improvement_summary"
BUILDS = "gold.hierarchy_builds"  # per programme, its latest build: a tree, or why none
BAND_ORDER = {"low": 0, "medium": 1, "high": 2}
FEATURES = "gold.features_patient"
ALGORITHM = "decision-tree"
NEXT_WITHIN_DAYS = 400  # the next as-of counts as "a year on" when at most this far
PERSON = "_person"  # who a row is about: a generated copy counts as the sample patient it copies


@dataclass(frozen=True)
class Programme:
    name: str
    description: str
    cohort: str
    outcome: str
    outcome_description: str
    features: tuple[str, ...]
    modifiable: dict[str, str]  # feature -> the way care may move it: down, up or any

    @property
    def model_id(self) -> str:
        return f"hierarchy.{self.name}"


@dataclass(frozen=True)
class Settings:
    max_depth: int = 4
    min_leaf_patients: int = 11
    seed: int = 42
    words: dict[str, str] = field(default_factory=dict)
    programmes: dict[str, Programme] = field(default_factory=dict)

    def programme(self, name: str) -> Programme:
        if name not in self.programmes:
            raise ConfigError(
                f"unknown programme {name!r} (conf/hierarchy.yaml has: {', '.join(self.programmes)})"
            )
        return self.programmes[name]


def load(path: str | Path | None = None) -> Settings:
    path = Path(path or HIERARCHY_FILE)
    data = read_yaml(path)
    unknown = set(data) - {"max_depth", "min_leaf_patients", "seed", "words", "programmes"}
    if unknown:
        raise ConfigError(f"{path.name}: unknown key(s) {sorted(unknown)}")
    programmes = {}
    for name, p in (data.get("programmes") or {}).items():
        try:
            features = tuple(p["features"])
            modifiable = _directions(p.get("modifiable"), f"{path.name}: {name}")
            programme = Programme(
                name, p.get("description", name), p["cohort"], p["outcome"]["when"],
                p["outcome"].get("description", p["outcome"]["when"]), features, modifiable,
            )  # fmt: skip
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"{path.name}: programme {name!r} needs cohort, outcome.when and features ({e})"
            ) from None
        if not set(modifiable) <= set(features):
            raise ConfigError(f"{path.name}: {name}: modifiable features must be among its features")
        programmes[name] = programme
    settings = Settings(
        int(data.get("max_depth", 4)), int(data.get("min_leaf_patients", 11)), int(data.get("seed", 42)),
        dict(data.get("words") or {}), programmes,
    )  # fmt: skip
    if not 1 <= settings.max_depth <= 8 or settings.min_leaf_patients < 1 or not programmes:
        raise ConfigError(f"{path.name}: max_depth 1-8, min_leaf_patients >= 1 and at least one programme")
    return settings


def _directions(declared, where: str) -> dict[str, str]:
    """``modifiable`` as {feature: down | up | any}: a list means any; a mapping names the way."""
    if not declared:
        return {}
    if isinstance(declared, list):
        return dict.fromkeys(declared, "any")
    if not isinstance(declared, dict) or not set(declared.values()) <= {"down", "up", "any"}:
        raise ConfigError(f"{where}: modifiable maps each feature to down, up or any")
    return dict(declared)


# ----------------------------------------------------------------------------------- rows
def programme_rows(lake, p: Programme) -> DataFrame:
    """The programme's cohort rows with ``label``: the outcome on the patient's next as-of row, if
    that row lies a year on (rows without one are left out: their outcome is not seen yet)."""
    if not lake.exists(FEATURES):
        raise EhrlakeError(f"no {FEATURES} yet: run ehrlake features first")
    rows = lake.read(FEATURES)
    missing = [c for c in p.features if c not in rows.columns]
    if missing:
        raise ConfigError(f"programme {p.name}: no feature(s) {missing} in {FEATURES}")
    by_patient = Window.partitionBy("patient_key").orderBy("index_time")
    nxt = rows.select(
        "*",
        F.lead("index_time").over(by_patient).alias("_next_time"),
        F.lead(F.expr(p.outcome)).over(by_patient).alias("_next_outcome"),
    )
    within = F.col("_next_time") <= F.col("index_time") + F.expr(f"INTERVAL {NEXT_WITHIN_DAYS} DAYS")
    return (
        nxt.where(F.expr(p.cohort) & within & F.col("_next_outcome").isNotNull())
        .withColumn("label", F.col("_next_outcome").cast("int"))
        .drop("_next_time", "_next_outcome")
    )


def with_people(lake, rows: DataFrame) -> DataFrame:
    """``rows`` (with ``patient_key``) and the person each is about: a generated copy is the sample
    patient it copies (:func:`ehrlake.clean.origin.with_templates`), so k patients in a leaf means k
    people, not k copies of one sample patient."""
    from ehrlake.clean import origin

    rows = origin.with_templates(lake, rows)
    return rows.withColumn(PERSON, F.coalesce(F.col("template_key"), F.col("patient_key")))


def inputs(p: Programme, columns: list[str]) -> list[str]:
    """The tree's inputs: the programme's features and, for each lab, its missing flag."""
    flags = [
        f"missing_{c[5:]}" for c in p.features if c.startswith("last_") and f"missing_{c[5:]}" in columns
    ]
    return [*p.features, *flags]


def medians(rows: DataFrame, features: list[str]) -> dict[str, float]:
    """Per lab feature, the median of the fitted rows (what a missing value is filled with)."""
    labs = [c for c in features if c.startswith("last_")]
    if not labs:
        return {}
    got = rows.select(*[F.percentile_approx(c, 0.5).alias(c) for c in labs]).first()
    return {c: float(got[c]) if got[c] is not None else 0.0 for c in labs}


def filled(rows: DataFrame, names: list[str], fill: dict[str, float]) -> DataFrame:
    """``rows`` with the inputs as doubles, a missing lab value as its median (its flag says so)."""
    cols = [F.coalesce(F.col(c).cast("double"), F.lit(fill.get(c, 0.0))).alias(c) for c in names]
    return rows.select(*[c for c in rows.columns if c not in names], *cols)


# ----------------------------------------------------------------------------------- the tree
@dataclass
class Node:
    """One node, numbered as a heap (root 1; children 2n and 2n + 1, left first)."""

    node_id: int
    depth: int
    conditions: list[tuple[str, str, float]]  # (feature, "<=" or ">", threshold) from the root
    leaf: bool
    probability: float  # the fitted rows' outcome rate in the node: the tree's score at a leaf
    split: tuple[str, float] | None = None

    @property
    def parent_id(self) -> int | None:
        return self.node_id // 2 if self.node_id > 1 else None


def nodes(model, names: list[str], positive_weight: float = 1.0) -> list[Node]:
    """Every node of a fitted tree, pre-order, read from its JVM tree; each node's outcome rate
    unweighted (a tree fitted with ``positive_weight`` per positive row holds weighted counts). The
    hierarchy's trees are ``DecisionTreeRegressionModel`` on the 0/1 outcome (:func:`fit`)."""
    out: list[Node] = []

    def walk(java, node_id: int, depth: int, conditions: list) -> None:
        # variance statistics: the weighted count, sum and sum of squares of a 0/1 label
        count, total, _ = list(java.impurityStats().stats())
        negatives, positives = count - total, total / positive_weight
        probability = positives / (negatives + positives) if negatives + positives else 0.0
        if java.getClass().getSimpleName() != "InternalNode":
            out.append(Node(node_id, depth, conditions, True, probability))
            return
        split = java.split()
        if split.getClass().getSimpleName() != "ContinuousSplit":
            raise EhrlakeError("the hierarchy's tree has a categorical split: its inputs are all numbers")
        feature, threshold = names[split.featureIndex()], float(split.threshold())
        out.append(Node(node_id, depth, conditions, False, probability, (feature, threshold)))
        walk(java.leftChild(), 2 * node_id, depth + 1, [*conditions, (feature, "<=", threshold)])
        walk(java.rightChild(), 2 * node_id + 1, depth + 1, [*conditions, (feature, ">", threshold)])

    walk(model._java_obj.rootNode(), 1, 0, [])
    return out


def load_tree(lake, mv) -> list[Node]:
    """The nodes of a registered hierarchy model as it was fitted (its rows weighted, so a
    node's ``probability`` is what the saved model predicts there, not the rows' outcome rate)."""
    from pyspark.ml.regression import DecisionTreeRegressionModel

    return nodes(DecisionTreeRegressionModel.load(mv.artifact_path(lake)), mv.features)


def met(feature: str, op: str, threshold: float) -> Column:
    """One condition of a rule ("<=" goes left in the tree, ">" right) as SQL."""
    return F.col(feature) <= threshold if op == "<=" else F.col(feature) > threshold


def leaf_of(tree: list[Node]) -> Column:
    """The leaf a row falls in, by the nodes' rules as SQL (the tree's decision, not a copy of it)."""
    expr = F.lit(None).cast("int")
    for n in reversed([n for n in tree if n.leaf]):
        rule = F.lit(True)
        for feature, op, threshold in n.conditions:
            rule = rule & met(feature, op, threshold)
        expr = F.when(rule, F.lit(n.node_id)).otherwise(expr)
    return expr


def path_of(leaf: Column, depth: int) -> Column:
    """The node ids from a leaf up to the root (heap numbering: a parent is n // 2)."""
    return F.array_distinct(F.array(*[F.shiftright(leaf, i) for i in range(depth + 1)])).alias("_path")


# ----------------------------------------------------------------------------------- words
def describer(settings: Settings, defs=None):
    """(feature, op, threshold) -> words: "glucose (mg/dL) > 126", "no diabetes", "no eGFR in 2 years"."""
    defs = defs or definitions.load()
    years = round(defs.windows.labs_days / 365)

    def name(feature: str) -> str:
        if feature in settings.words:
            return settings.words[feature]
        if feature.startswith("last_") and feature[5:] in defs.labs:
            return defs.labs[feature[5:]].description
        return feature.replace("_", " ")

    def words(feature: str, op: str, threshold: float) -> str:
        yes = op == ">" and threshold >= 0.0 and threshold < 1.0
        if feature.startswith("has_") and feature[4:] in defs.condition_groups:
            what = defs.condition_groups[feature[4:]].description
            return what if yes else f"no {what}"
        if feature.startswith("missing_"):
            lab = defs.labs[feature[8:]].description if feature[8:] in defs.labs else feature[8:]
            return f"no {lab} in {years} years" if yes else f"{lab} measured"
        if feature == "sex_female":
            return "female" if yes else "not female"
        value = f"{threshold:.1f}".rstrip("0").rstrip(".")
        return f"{name(feature)} {op} {value}"

    return words


def rule_words(n: Node, words) -> str:
    return " and ".join(words(*c) for c in n.conditions) or "everyone in the programme"


# ----------------------------------------------------------------------------------- build
def fit(fitted_rows: DataFrame, names: list[str], settings: Settings, programme: str, counts=None):
    """(model, its nodes, the leaf size in rows, the weight of a positive row) of a tree on filled
    rows with ``label``, every leaf holding ``min_leaf_patients`` distinct patients: refitted with
    leaves of twice the rows until it does (rows are patient x date, so a leaf of k rows may hold
    fewer than k patients). ``counts``: (positive rows, rows) when the caller has them.

    A regression tree on the 0/1 outcome, its classes balanced by weight (each positive row counts
    negatives / positives). Its variance splits are the Gini splits of a classification tree, but
    Spark's classification trees merge sibling leaves that predict the same class (SPARK-3159; no
    switch before Spark 4.3): with an outcome in one row of eight every leaf predicts "no" and only
    the branches to groups above 50% survive; balanced, siblings that are both above (or both
    below) the population's rate still merge. A regression tree keeps every leaf its depth and
    leaf size allow. Diabetes 130-US readmission, test AUROC: classification 0.586 unweighted,
    0.636 balanced, regression balanced 0.648; XGBoost 0.667 (bench/hierarchy.py, docs/hierarchy.md).
    The nodes' rates are given unweighted (:func:`nodes`)."""
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.regression import DecisionTreeRegressor

    k = settings.min_leaf_patients
    positives, total = counts or fitted_rows.agg(F.sum("label"), F.count("*")).first()
    weight = (total - positives) / positives if positives else 1.0
    vectors = VectorAssembler(inputCols=names, outputCol="_features").transform(fitted_rows)
    vectors = vectors.withColumn("_weight", F.when(F.col("label") == 1, F.lit(weight)).otherwise(F.lit(1.0)))
    min_rows = k
    for _ in range(8):
        model = DecisionTreeRegressor(
            featuresCol="_features", labelCol="label", weightCol="_weight", maxDepth=settings.max_depth,
            minInstancesPerNode=min_rows, seed=settings.seed,
        ).fit(vectors)  # fmt: skip
        tree = nodes(model, names, weight)
        smallest = (
            fitted_rows.select(PERSON, leaf_of(tree).alias("_leaf"))
            .groupBy("_leaf")
            .agg(F.countDistinct(PERSON).alias("n"))
            .agg(F.min("n"))
            .first()[0]
        )
        if smallest >= k:
            return model, tree, min_rows, weight
        min_rows *= 2
    raise EhrlakeError(f"programme {programme}: no tree with {k} patients in every leaf")


def build(lake, programme: str, role: str | None = None, settings: Settings | None = None):
    """Fit, register and describe the programme's tree; returns its registered ModelVersion. The
    outcome, a tree or the one-line reason there is none, is recorded in ``gold.hierarchy_builds``
    (the report names each refused programme with its reason)."""
    settings = settings or load()
    p = settings.programme(programme)
    try:
        mv = _build(lake, p, role, settings)
    except (AccessDenied, JobRunning):
        raise  # about who runs it and when, not about the programme
    except EhrlakeError as e:
        with contextlib.suppress(EhrlakeError):  # the build's own reason is the one to say
            _record(lake, p, role, None, str(e))
        raise
    _record(lake, p, role, mv, None)
    return mv


def _record(lake, p: Programme, role: str | None, mv, reason: str | None) -> None:
    from ehrlake.lake import WriteMode

    row = [(p.name, p.description, "refused" if mv is None else "built", reason,
            None if mv is None else mv.model_id, None if mv is None else mv.version,
            dt.datetime.now(dt.UTC).replace(tzinfo=None))]  # fmt: skip
    frame = lake.spark.createDataFrame(
        row,
        "programme string, description string, status string, reason string, model_id string, "
        "version int, built_at timestamp",
    )
    with lake.security.job("hierarchy", ["gold"], role) as (_, audit):
        lake.create(BUILDS, frame.schema, ["programme"])
        lake.write(frame, BUILDS, mode=WriteMode.OVERWRITE, where={"programme": p.name})
        audit.append((BUILDS, f"{p.name}: {reason or mv.label}"))


def _build(lake, p: Programme, role: str | None, settings: Settings):
    from ehrlake.models import evaluate, registry, versions
    from ehrlake.models.train import split

    k = settings.min_leaf_patients
    features_version = lake.version(FEATURES) if lake.exists(FEATURES) else None
    rows = with_people(lake, programme_rows(lake, p))
    names = inputs(p, rows.columns)
    train, test = split(rows, settings.seed)
    train, pred, cohort = train.cache(), None, None
    try:
        counts = train.agg(F.count("*"), F.countDistinct(PERSON), F.sum("label")).first()
        if counts[1] < 2 * k or not 0 < (counts[2] or 0) < counts[0]:
            raise EhrlakeError(
                f"programme {p.name}: {counts[1]} training patients of the cohort ({p.cohort}) whose outcome "
                f"a year on is known ({p.outcome}), {counts[2] or 0} of their {counts[0]} rows with it; "
                f"leaves of {k} patients need {2 * k} and both outcomes"
            )
        fill = medians(train, names)
        fitted_rows = filled(train, names, fill)
        scale = scales(fitted_rows, names)
        model, tree, min_rows, weight = fit(fitted_rows, names, settings, p.name, (counts[2], counts[0]))
        score = lookup({n.node_id: n.probability for n in tree if n.leaf}, F.col("_leaf"))
        pred = filled(test, names, fill).withColumn("_leaf", leaf_of(tree)).withColumn("score", score).cache()
        version, artifact, path = versions.new_artifact(lake, p.model_id)
        model.save(path)
        with lake.security.job("hierarchy", ["gold"], role) as (_, audit):
            mv = registry.ModelVersion(
                model_id=p.model_id,
                version=version,
                task=p.model_id,
                algorithm=ALGORITHM,
                params={
                    "programme": p.name,
                    "max_depth": settings.max_depth,
                    "min_leaf_patients": k,
                    "min_leaf_rows": min_rows,
                    "positive_weight": weight,
                    "fill": fill,
                    "scales": scale,
                    "outcome": p.outcome,
                    "cohort": p.cohort,
                    "modifiable": dict(p.modifiable),
                    "threshold": counts[2] / counts[0],
                    "train_rows": counts[0],
                    "train_patients": counts[1],
                },  # fmt: skip
                features=names,
                training_data={FEATURES: features_version},
                metrics=evaluate.metrics(pred, counts[2] / counts[0]),
                bands=evaluate.risk_bands(pred),
                artifact=artifact,
                created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
                status="candidate",
            )
            mv = versions.register(lake, audit, mv, pred)
            _write_nodes(lake, p, mv, tree, fitted_rows, settings, k)
            cohort = placed(lake, p, tree, names, fill).cache()  # read once for both tables
            _write_progress(lake, p, mv, progress(cohort, p, tree, mv.bands), k)
            _write_improvements(lake, p, mv, improvements(cohort, p, tree, scale, describer(settings)), k)
            audit.append((NODES, f"{mv.label}: {sum(n.leaf for n in tree)} leaves"))
            audit.append((PROGRESS, f"{mv.label}: every cohort row's node and transition"))
            audit.append((IMPROVEMENT, f"{mv.label}: the nearest lower-risk leaf by modifiable features"))
            audit.append((IMPROVEMENT_SUMMARY, f"{mv.label}: people per area for improvement, k={k}"))
        return mv
    finally:  # failing or not, the fitted, scored and placed rows leave the cache
        train.unpersist()
        for frame in (pred, cohort):
            if frame is not None:
                frame.unpersist()


def _write_nodes(lake, p: Programme, mv, tree: list[Node], fitted_rows: DataFrame, settings, k: int) -> None:
    """Every node with its rule, patients, rows and outcome rate on the fitted rows (hidden below k)."""
    from ehrlake.lake import WriteMode
    from ehrlake.models import evaluate

    words = describer(settings)
    depth = max(n.depth for n in tree)
    per_node = {
        r["node"]: r
        for r in fitted_rows.select(PERSON, "label", path_of(leaf_of(tree), depth))
        .select(PERSON, "label", F.explode("_path").alias("node"))
        .groupBy("node")
        .agg(
            F.countDistinct(PERSON).alias("patients"),
            F.count("*").alias("rows"),
            F.avg("label").alias("rate"),
        )
        .collect()
    }  # one row per node: at most 2^(depth + 1)
    rows = []
    for n in tree:
        got = per_node.get(n.node_id)
        patients = int(got["patients"]) if got else 0
        shown = patients >= k
        split = None if n.split is None else words(n.split[0], ">", n.split[1])
        own = words(*n.conditions[-1]) if n.conditions else rule_words(n, words)
        rows.append(
            (
                p.name, mv.model_id, mv.version, n.node_id, n.parent_id, n.depth, n.leaf,
                rule_words(n, words), own, split, patients if shown else None,
                int(got["rows"]) if got and shown else None, float(got["rate"]) if got and shown else None,
                evaluate.band_of(n.probability, mv.bands) if shown else None,
            )
        )  # fmt: skip
    frame = lake.spark.createDataFrame(
        rows,
        "programme string, model_id string, version int, node_id int, parent_id int, depth int, "
        "leaf boolean, rule string, condition string, split string, patients long, rows long, "
        "outcome_rate double, "
        "risk_band string",
    )
    lake.create(NODES, frame.schema, ["programme"])  # the latest tree of each programme
    lake.write(frame, NODES, mode=WriteMode.OVERWRITE, where={"programme": p.name})


# ----------------------------------------------------------------------------------- progress
def placed(lake, p: Programme, tree: list[Node], names: list[str], fill: dict) -> DataFrame:
    """Every cohort row (every as-of, the latest too: placing a patient needs no outcome) with its
    inputs filled as the tree was fitted and its leaf in ``node``. A row's node depends on its own
    point-in-time features only, so a later record never moves a past node. With :data:`PERSON`,
    for counts of people."""
    rows = with_people(lake, lake.read(FEATURES).where(F.expr(p.cohort)))
    return filled(rows, names, fill).withColumn("node", leaf_of(tree))


def progress(rows: DataFrame, p: Programme, tree: list[Node], bands: dict) -> DataFrame:
    """Every cohort row's leaf (``rows``: :func:`placed`), its risk and band, the patient's previous
    node and band, and the transition: ``first``, or ``improved`` / ``worsened`` / ``stable`` by
    risk band."""
    from ehrlake.models import evaluate

    leaves = [n for n in tree if n.leaf]
    risk = {n.node_id: n.probability for n in leaves}
    band = {n.node_id: evaluate.band_of(n.probability, bands) for n in leaves}
    rows = rows.select("patient_key", PERSON, F.col("index_time").alias("as_of"), "node")
    rows = rows.withColumn("risk", lookup(risk, F.col("node"))).withColumn(
        "risk_band", lookup(band, F.col("node"))
    )
    w = Window.partitionBy("patient_key").orderBy("as_of")
    before = rows.select(
        "*",
        F.lag("as_of").over(w).alias("previous_as_of"),
        F.lag("node").over(w).alias("previous_node"),
        F.lag("risk_band").over(w).alias("previous_band"),
    )
    now, then = lookup(BAND_ORDER, F.col("risk_band")), lookup(BAND_ORDER, F.col("previous_band"))
    transition = (
        F.when(F.col("previous_node").isNull(), "first")
        .when(now < then, "improved")
        .when(now > then, "worsened")
        .otherwise("stable")
    )
    return before.withColumn("transition", transition).withColumn("programme", F.lit(p.name))


def _write_progress(lake, p: Programme, mv, placed: DataFrame, k: int) -> None:
    """gold.patient_progress (one row per cohort patient and as-of) and gold.hierarchy_transitions
    (patients per year, previous band and band; counts below k hidden), the programme's partition."""
    from ehrlake.lake import WriteMode

    rows = placed.select(
        "programme", F.lit(mv.model_id).alias("model_id"), F.lit(mv.version).alias("version"),
        "patient_key", "as_of", "node", "risk", "risk_band", "previous_as_of", "previous_node",
        "previous_band", "transition",
    )  # fmt: skip
    lake.create(PROGRESS, rows.schema, ["programme"])
    lake.write(rows, PROGRESS, mode=WriteMode.OVERWRITE, where={"programme": p.name})
    moves = (
        placed.where(F.col("previous_band").isNotNull())
        .groupBy("programme", F.year("as_of").alias("year"), "previous_band", "risk_band")
        .agg(F.countDistinct(PERSON).alias("n"))
    )
    moves = moves.withColumn("patients", F.when(F.col("n") >= k, F.col("n"))).drop("n")
    lake.create(TRANSITIONS, moves.schema, ["programme"])
    lake.write(moves, TRANSITIONS, mode=WriteMode.OVERWRITE, where={"programme": p.name})


# ----------------------------------------------------------------------------------- improvement
def movable(p: Programme, feature: str, op: str) -> bool:
    """Whether care can meet a rule's condition: a modifiable feature the way it may move (a
    ``down`` feature to "<= x" only: never "raise BMI above 30"); a modifiable lab's missing flag
    only towards "measured" (never "stop measuring"); nothing else."""
    if feature.startswith("missing_"):
        return f"last_{feature[8:]}" in p.modifiable and op == "<="
    way = p.modifiable.get(feature)
    return way == "any" or (way == "down" and op == "<=") or (way == "up" and op == ">")


def scales(rows: DataFrame, names: list[str]) -> dict[str, float]:
    """Per input, the fitted rows' standard deviation: a change is measured in these units."""
    got = rows.select(*[F.stddev(c).alias(c) for c in names]).first()
    return {c: float(got[c]) if got[c] else 1.0 for c in names}


def improvements(rows: DataFrame, p: Programme, tree: list[Node], scale: dict, words) -> DataFrame:
    """For every cohort row (``rows``: :func:`placed`), the nearest leaf of lower risk that changing
    modifiable features alone reaches, and the changes. A leaf is reachable when the row already
    meets every condition of its rule that care cannot change; the changes are the rule's unmet
    modifiable conditions, and the nearest is the one with the least total change in standard
    deviations (then the fewest changes, then the lowest risk). A row in no such reach gets a
    ``status`` saying why, never a change to age, sex or history."""
    leaves = [n for n in tree if n.leaf]
    risk = {n.node_id: n.probability for n in leaves}
    rule = {n.node_id: rule_words(n, words) for n in leaves}
    rows = rows.withColumn("risk", lookup(risk, F.col("node")))

    def now(feature: str) -> Column:  # a missing lab's value is its fill: "not measured" is null
        flag = f"missing_{feature[5:]}"
        value = F.col(feature).cast("double")
        return F.when(F.col(flag) != 1, value) if flag in rows.columns else value

    candidates = []
    for t in leaves:
        fixed = F.lit(True)
        changes, distance = [], F.lit(0.0)
        for feature, op, threshold in t.conditions:
            if not movable(p, feature, op):
                fixed = fixed & met(feature, op, threshold)
                continue
            unmet = ~met(feature, op, threshold)
            change = F.struct(
                F.lit(feature).alias("feature"), F.lit(op).alias("op"), F.lit(threshold).alias("threshold"),
                now(feature).alias("current"), F.lit(words(feature, op, threshold)).alias("change"),
            )  # fmt: skip
            changes.append(F.when(unmet, change))
            gap = F.abs(F.col(feature) - F.lit(threshold)) / F.lit(scale.get(feature) or 1.0)
            distance = distance + F.when(unmet, gap).otherwise(0.0)
        if not changes:  # a row meeting all of such a leaf's conditions is in it already
            continue
        needed = F.filter(F.array(*changes), lambda c: c.isNotNull())
        candidates.append(
            F.when(
                fixed & (F.lit(t.probability) < F.col("risk")),
                F.struct(
                    distance.alias("distance"),
                    F.size(needed).alias("n"),
                    F.lit(t.probability).alias("risk"),
                    F.lit(t.node_id).alias("node"),
                    needed.alias("changes"),
                ),
            )  # fmt: skip
        )
    if candidates:
        reachable = F.filter(F.array(*candidates), lambda c: c.isNotNull())
        best = F.try_element_at(F.array_sort(reachable), F.lit(1))
    else:  # the tree splits on no modifiable feature: nothing is within reach
        best = F.lit(None).cast(
            "struct<distance: double, n: int, risk: double, node: int, changes: array<struct<"
            "feature: string, op: string, threshold: double, current: double, change: string>>>"
        )
    lowest = min(risk.values())
    status = (
        F.when(F.col("_best").isNotNull(), "lower risk within reach")
        .when(F.col("risk") <= lowest, "already in the lowest-risk group")
        .otherwise("no lower-risk group by modifiable features")
    )
    target_rule = F.when(F.col("_best").isNotNull(), lookup(rule, F.col("_best.node")))
    out = rows.select(
        "patient_key", PERSON, F.col("index_time").alias("as_of"), "node", "risk", best.alias("_best")
    )
    return out.select(
        F.lit(p.name).alias("programme"), "patient_key", PERSON, "as_of", "node", "risk",
        status.alias("status"),
        F.col("_best.node").alias("target_node"), F.col("_best.risk").alias("target_risk"),
        target_rule.alias("target_rule"), F.col("_best.changes").alias("changes"),
        F.concat_ws("; ", F.transform("_best.changes", lambda c: c["change"])).alias("summary"),
        F.col("_best.distance").alias("distance"),
    )  # fmt: skip


def improvement_counts(rows: DataFrame, k: int) -> DataFrame:
    """People at their latest as-of (``rows``: :func:`improvements`) by area: each change that
    would move them to a lower-risk group ("systolic blood pressure (mm Hg) <= 170.9"), or their
    status where none would; a person with two changes counts under both. ``patients`` and
    ``share`` (of the programme's people) are hidden below k."""
    latest = rows.withColumn(
        "_n", F.row_number().over(Window.partitionBy(PERSON).orderBy(F.col("as_of").desc(), "patient_key"))
    ).where("_n = 1")
    areas = latest.select(
        "programme",
        PERSON,
        "status",
        F.explode_outer(F.transform("changes", lambda c: c["change"])).alias("change"),
    )
    counted = areas.groupBy(
        "programme",
        F.when(F.col("change").isNotNull(), "change").otherwise("status").alias("kind"),
        F.coalesce("change", "status").alias("area"),
    ).agg(F.countDistinct(PERSON).alias("n"))
    people = latest.count()  # one row per person
    shown = F.col("n") >= k
    return counted.select(
        "programme", "kind", "area",
        F.when(shown, F.col("n")).alias("patients"),
        F.when(shown & (F.lit(people) >= k), F.round(F.col("n") / F.lit(people), 3)).alias("share"),
    )  # fmt: skip


def _write_improvements(lake, p: Programme, mv, rows: DataFrame, k: int) -> None:
    """gold.improvement_areas (a row per cohort row) and gold.improvement_summary (people per area,
    hidden below k), the programme's partition of each."""
    from ehrlake.lake import WriteMode

    stamp = [F.lit(mv.model_id).alias("model_id"), F.lit(mv.version).alias("version")]
    areas = rows.select("programme", *stamp, *[c for c in rows.columns if c not in ("programme", PERSON)])
    lake.create(IMPROVEMENT, areas.schema, ["programme"])
    lake.write(areas, IMPROVEMENT, mode=WriteMode.OVERWRITE, where={"programme": p.name})
    counts = improvement_counts(rows, k)
    counts = counts.select("programme", *stamp, *counts.columns[1:])
    lake.create(IMPROVEMENT_SUMMARY, counts.schema, ["programme"])
    lake.write(counts, IMPROVEMENT_SUMMARY, mode=WriteMode.OVERWRITE, where={"programme": p.name})


# ----------------------------------------------------------------------------------- show
def refusal(build) -> str:
    """Why a programme's latest build (its ``gold.hierarchy_builds`` row, refused) made no tree,
    in the words ``show`` and the report both use."""
    return f"latest build ({build.built_at:%Y-%m-%d}) made no tree: {build.reason}"


def show(lake, programme: str, role: str | None = None, settings: Settings | None = None) -> str:
    """The programme's latest tree as indented text: each node's own condition, its patients and
    outcome rate (or that it has fewer than k), the risk band; read under the access policy."""
    from ehrlake.models import registry

    settings = settings or load()
    p = settings.programme(programme)
    read = lambda t: lake.read(t, role=role) if role else lake.read(t)  # noqa: E731
    # at most 2^9 nodes; one row per programme
    rows = (
        {r.node_id: r for r in read(NODES).where(F.col("programme") == p.name).collect()}
        if lake.exists(NODES)
        else {}
    )
    if not rows:
        last = read(BUILDS).where(F.col("programme") == p.name).collect() if lake.exists(BUILDS) else []
        if last and last[0].status == "refused":
            raise EhrlakeError(f"no tree of {p.name}: its {refusal(last[0])}")
        raise EhrlakeError(f"no tree of {p.name} yet: run ehrlake hierarchy build --programme {p.name}")
    mv = registry.get(lake, rows[1].model_id, rows[1].version)
    lines = [f"{p.description}: {mv.label}, {mv.headline()}", f"outcome: {p.outcome_description}"]

    def line(node_id: int) -> None:
        n = rows[node_id]
        what = (
            f"{n.patients:,} patients, outcome {n.outcome_rate:.0%}, {n.risk_band} risk"
            if n.patients is not None
            else f"fewer than {settings.min_leaf_patients} patients"
        )
        lines.append(f"{'  ' * n.depth}{'- ' if n.leaf else '+ '}{n.condition}: {what}")
        for child in (2 * node_id, 2 * node_id + 1):
            if child in rows:
                line(child)

    line(1)
    return "\n".join(lines)
