"""The lake's population against India's NFHS-5 state indicators (``data/reference/nfhs5_states.csv``).

For each Indian state in the lake and each sex, three survey indicators are recomputed from the
latest measurement of every person aged 15 or more: overweight or obese (BMI >= 25 kg/m2), blood
sugar above 140 mg/dL, and elevated blood pressure (systolic >= 140 or diastolic >= 90 mm Hg).
NFHS-5 also counts people taking medicine for sugar or pressure; the lake's figure does not, so it is
a lower bound (said in ``definition``). States match by name, so a lake without Indian states gives
an empty table. Counts of persons meeting an indicator are small-cell suppressed like every gold table.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from ehrlake.home import HOME

REFERENCE = HOME / "data" / "reference" / "nfhs5_states.csv"

# indicator -> (LOINC codes, condition over `value`, NFHS-5 indicator number for women, for men, definition)
INDICATORS = {
    "overweight_or_obese": (("39156-5",), "value >= 25", 88, 89, "latest BMI >= 25 kg/m2"),
    "blood_sugar_over_140": (("2339-0", "2345-7"), "value > 140", 101, 104,
                             "latest glucose > 140 mg/dL (NFHS-5 also counts people on medication)"),
    "elevated_blood_pressure": (("8480-6", "8462-4"), None, 107, 110,
                                "latest systolic >= 140 or diastolic >= 90 mm Hg (NFHS-5 also counts "
                                "medication)"),
}  # fmt: skip


def survey(spark) -> DataFrame:
    """NFHS-5 state totals of the compared indicators: state, sex, indicator, nfhs5_percent."""
    raw = spark.read.option("header", True).csv(str(REFERENCE))
    number = F.regexp_extract("indicator", r"^(\d+)\.", 1).cast("int")
    rows = []
    for name, (_, _, women, men, _) in INDICATORS.items():
        for sex, num in (("female", women), ("male", men)):
            rows.append(
                raw.where(number == num).select(
                    F.col("state"), F.lit(sex).alias("sex"), F.lit(name).alias("indicator"),
                    F.col("nfhs5_total").cast("double").alias("nfhs5_percent"),
                )
            )  # fmt: skip
    out = rows[0]
    for r in rows[1:]:
        out = out.unionByName(r)
    return out.where(F.col("state") != "India")


def comparison(lake, survey_df: DataFrame) -> DataFrame:
    """Per state, sex and indicator: persons measured, persons meeting it, percent, NFHS-5 percent.

    One pass over the observations: the latest measurement of each indicator code per person (one
    window over every indicator's codes), then per person whether each indicator is met (null where
    the person has none of its codes), stacked into one row per person and indicator measured.
    Three passes, one per indicator, read and shuffled the largest silver table three times."""
    people = lake.read("silver.patient").select("patient_key", "state", F.col("gender").alias("sex"))
    codes = [code for codes, *_ in INDICATORS.values() for code in codes]
    obs = lake.read("silver.observation").where(F.col("value_number").isNotNull())
    obs = obs.where((F.col("age_at_event") >= 15) & F.col("code").isin(*codes))
    latest = Window.partitionBy("patient_key", "code").orderBy(F.desc("effective_at"))
    obs = obs.withColumn("_rank", F.row_number().over(latest)).where("_rank = 1")
    obs = obs.select("patient_key", "code", F.col("value_number").alias("value"))
    met = []
    for name, (codes, condition, *_) in INDICATORS.items():
        if condition is None:  # blood pressure: either reading over its threshold
            hit = ((F.col("code") == "8480-6") & (F.col("value") >= 140)) | (
                (F.col("code") == "8462-4") & (F.col("value") >= 90)
            )
        else:
            hit = F.expr(condition)
        met.append(F.max(F.when(F.col("code").isin(*codes), hit.cast("int"))).alias(name))
    per_person = obs.groupBy("patient_key").agg(*met)
    pairs = ", ".join(f"'{name}', `{name}`" for name in INDICATORS)
    measured = per_person.select(
        "patient_key", F.expr(f"stack({len(INDICATORS)}, {pairs}) AS (indicator, meets)")
    ).where(F.col("meets").isNotNull())
    definitions = F.create_map(*[F.lit(v) for name, (*_, d) in INDICATORS.items() for v in (name, d)])
    measured = measured.withColumn("definition", definitions[F.col("indicator")])
    counts = (
        measured.join(people, "patient_key")
        .groupBy("state", "sex", "indicator", "definition")
        .agg(F.count("*").alias("persons_measured"), F.sum("meets").alias("persons_meeting"))
    )
    out = counts.join(survey_df, ["state", "sex", "indicator"])  # Indian states only
    percent = F.round(100 * F.col("persons_meeting") / F.col("persons_measured"), 1)
    return out.withColumn("lake_percent", percent).withColumn(
        "difference", F.round(F.col("lake_percent") - F.col("nfhs5_percent"), 1)
    )
