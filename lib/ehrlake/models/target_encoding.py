"""Target encoding of many-valued codes (diagnoses, specialties, payers), fitted on training labels only.

A code's encoding is the label rate of the rows that carry it, shrunk towards the overall rate by
``strength`` pseudo-rows: ``(positives + strength * rate) / (rows + strength)``, so a code seen
twice says little and an unseen or missing code says the overall rate. Because it is made of
labels, a row must never be encoded with statistics its own label went into, or a learner reads
its label back through it:

- rows a model is fitted on get :func:`out_of_fold` encodings: the rows of each fold are encoded
  from the other folds' labels;
- rows it is evaluated or scored on (a CV evaluation fold, the held-out test patients, new data)
  get :func:`encode` from every fitting row.

:class:`FoldEncoded` puts both behind one Spark ML estimator, so ``ehrlake train``'s grouped
cross-validation and its final fit do the right thing by construction, and the fitted encoding
is a stage of the saved model (a ``SQLTransformer``: saved, loaded and applied like any stage).
The statistics are one row per code (bounded by the code list).
"""

from __future__ import annotations

from pyspark.ml import Estimator, Pipeline, PipelineModel
from pyspark.ml.feature import SQLTransformer
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

MISSING = "(missing)"
STRENGTH = 20.0
INNER_FOLDS = 5


def name(column: str) -> str:
    """The encoded column of ``column``."""
    return f"te_{column}"


def _key(column: str):
    return F.coalesce(F.col(column).cast("string"), F.lit(MISSING))


def _shrunk(positives, rows, rate, strength: float):
    """A code's label rate shrunk towards ``rate`` by ``strength`` pseudo-rows (numbers or columns)."""
    return (positives + strength * rate) / (rows + strength)


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_double(x: float) -> str:
    return f"{x:.17f}D"  # a rate in [0, 1]; a bare decimal would parse as DECIMAL


def encoder(fitted_on: DataFrame, columns: list[str], strength: float = STRENGTH) -> SQLTransformer:
    """The encoding of ``columns`` learnt from every row of ``fitted_on`` (with ``label``), as a
    stage: a map literal per column from code to its shrunk rate, the overall rate for an unseen
    code."""
    label = F.col("label").cast("double")
    rate = fitted_on.agg(F.avg(label)).first()[0]
    if rate is None:
        raise ValueError("target encoding needs labelled rows to fit on")
    encodings = []
    for column in columns:
        counts = (
            fitted_on.groupBy(_key(column).alias("code"))
            .agg(F.sum(label).alias("p"), F.count("*").alias("n"))
            .collect()  # one row per code
        )
        pairs = ", ".join(
            f"{_sql_string(r.code)}, {_sql_double(_shrunk(r.p, r.n, rate, strength))}"
            for r in sorted(counts, key=lambda r: r.code)
        )
        key = f"coalesce(CAST(`{column}` AS STRING), {_sql_string(MISSING)})"
        encodings.append(
            f"coalesce(try_element_at(map({pairs}), {key}), {_sql_double(rate)}) AS `{name(column)}`"
        )
    return SQLTransformer(statement=f"SELECT *, {', '.join(encodings)} FROM __THIS__")


def encode(
    fitted_on: DataFrame, rows: DataFrame, columns: list[str], strength: float = STRENGTH
) -> DataFrame:
    """``rows`` with :func:`name` of each of ``columns``, from ``fitted_on``'s labels."""
    return encoder(fitted_on, columns, strength).transform(rows)


def out_of_fold(rows: DataFrame, columns: list[str], fold: str = "cv_fold", strength: float = STRENGTH):
    """``rows`` (each in a ``fold``) encoded fold by fold from the other folds' labels: a code's
    counts over all folds less its own fold's, one aggregation and one join per column. A lone
    fold has no other: its rows get the overall rate."""
    label = F.col("label").cast("double")
    per_fold = rows.groupBy(fold).agg(F.sum(label).alias("p"), F.count("*").alias("n")).collect()  # folds
    everywhere_p, everywhere_n = sum(r.p for r in per_fold), sum(r.n for r in per_fold)
    rates = {
        r[fold]: (everywhere_p - r.p) / (everywhere_n - r.n)
        if everywhere_n > r.n
        else everywhere_p / everywhere_n
        for r in per_fold
    }
    rate = F.create_map(*[F.lit(x) for k, r in rates.items() for x in (k, r)])[F.col(fold)]
    out = rows.withColumn("_rate", rate)
    for column in columns:
        counts = rows.groupBy(fold, _key(column).alias("_code")).agg(
            F.sum(label).alias("_positives"), F.count("*").alias("_rows")
        )
        code = Window.partitionBy("_code")
        elsewhere = counts.select(
            fold,
            "_code",
            (F.sum("_positives").over(code) - F.col("_positives")).alias("_positives"),
            (F.sum("_rows").over(code) - F.col("_rows")).alias("_rows"),
        )
        out = (
            out.withColumn("_code", _key(column))
            .join(elsewhere, [fold, "_code"], "left")
            .withColumn(name(column), _shrunk(F.col("_positives"), F.col("_rows"), F.col("_rate"), strength))
            .drop("_code", "_positives", "_rows")
        )
    return out.drop("_rate")


class FoldEncoded(Estimator):
    """A learner's pipeline behind target encoding of ``columns``.

    Fitting encodes the fitting rows out of fold (``INNER_FOLDS`` folds by a hash of
    ``patient_key``, so a patient's several stays never encode each other) and fits ``inner`` on
    them; the fitted model is one ``PipelineModel``: the :func:`encoder` learnt from every fitting
    row, then ``inner``'s stages. Inside a cross-validation each training split is fitted this way
    and its evaluation fold is encoded from that split alone. Search parameters are ``inner``'s
    (``copy`` hands them on, as ``Pipeline`` does)."""

    def __init__(self, inner: Pipeline, columns: list[str], seed: int = 0, strength: float = STRENGTH):
        super().__init__()
        self.inner, self.columns, self.seed, self.strength = inner, list(columns), seed, strength

    def copy(self, extra=None) -> FoldEncoded:
        return FoldEncoded(self.inner.copy(extra), self.columns, self.seed, self.strength)

    def _fit(self, dataset: DataFrame) -> PipelineModel:
        fold = F.pmod(F.xxhash64(F.col("patient_key"), F.lit(self.seed)), F.lit(INNER_FOLDS))
        encoded = out_of_fold(dataset.withColumn("_te_fold", fold), self.columns, "_te_fold", self.strength)
        encoded = encoded.drop("_te_fold").cache()  # the learners pass over it many times
        fitted = self.inner.fit(encoded)
        encoded.unpersist()
        return PipelineModel([encoder(dataset, self.columns, self.strength), *fitted.stages])
