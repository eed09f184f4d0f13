"""Target encoding of many-valued codes (diagnoses, specialties, payers), fitted on training labels only.

A code's encoding is the label rate of the rows that carry it, shrunk towards the overall rate by
``strength`` pseudo-rows: ``(positives + strength * rate) / (rows + strength)``, so a code seen
twice says little and an unseen or missing code says the overall rate. Because it is made of
labels, a row must never be encoded with statistics its own label went into, or a learner reads
its label back through it:

- rows a model is fitted on get :func:`out_of_fold` encodings: the rows of each CV fold are
  encoded from the other folds' labels;
- rows it is evaluated or scored on (a CV evaluation fold, the held-out test patients, new data)
  get :func:`encode` from every fitting row.

The statistics are one row per code (bounded by the code list), broadcast to the join.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

MISSING = "(missing)"
STRENGTH = 20.0


def name(column: str) -> str:
    """The encoded column of ``column``."""
    return f"te_{column}"


def _key(column: str):
    return F.coalesce(F.col(column).cast("string"), F.lit(MISSING))


def _shrunk(positives, rows, rate, strength: float):
    """A code's label rate shrunk towards ``rate`` by ``strength`` pseudo-rows."""
    return (positives + F.lit(strength) * rate) / (rows + F.lit(strength))


def encode(
    fitted_on: DataFrame, rows: DataFrame, columns: list[str], strength: float = STRENGTH
) -> DataFrame:
    """``rows`` with :func:`name` of each of ``columns``, from ``fitted_on``'s labels."""
    rate = fitted_on.agg(F.avg(F.col("label").cast("double"))).first()[0]
    for column in columns:
        counts = fitted_on.groupBy(_key(column).alias("_code")).agg(
            F.sum(F.col("label").cast("double")).alias("_positives"), F.count("*").alias("_rows")
        )
        rows = (
            rows.withColumn("_code", _key(column))
            .join(F.broadcast(counts), "_code", "left")
            .withColumn(
                name(column),
                _shrunk(
                    F.coalesce("_positives", F.lit(0.0)), F.coalesce("_rows", F.lit(0)), F.lit(rate), strength
                ),
            )
            .drop("_code", "_positives", "_rows")
        )
    return rows


def out_of_fold(rows: DataFrame, columns: list[str], fold: str = "cv_fold", strength: float = STRENGTH):
    """``rows`` (each in a CV ``fold``) encoded fold by fold from the other folds' labels: a code's
    counts over all folds less its own fold's, one aggregation and one join per column."""
    label = F.col("label").cast("double")
    per_fold = rows.groupBy(fold).agg(F.sum(label).alias("p"), F.count("*").alias("n")).collect()  # folds
    everywhere_p, everywhere_n = sum(r.p for r in per_fold), sum(r.n for r in per_fold)
    rates = {r[fold]: (everywhere_p - r.p) / (everywhere_n - r.n) for r in per_fold}
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
            .withColumn(
                name(column),
                _shrunk(F.col("_positives"), F.col("_rows"), F.col("_rate"), strength),
            )
            .drop("_code", "_positives", "_rows")
        )
    return out.drop("_rate")
