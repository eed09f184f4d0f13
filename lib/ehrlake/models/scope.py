"""What a tabular model accepts, and which patients fall outside it.

A model is fitted on a population; a patient whose inputs lie far outside what that population
held (an age of 131, a lab value ten times the largest seen) gets a score the model has no
evidence for. Training records each input's range over the training rows (``accepts`` in the
model's params: input -> [lowest, highest]); scoring refuses a patient with any input beyond
that range by more than :data:`MARGIN` of its width, and names the inputs. A missing value is not
out of scope (the model imputes it as it did in training), nor is any value of an input that was
constant in training (no learner can have used it).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

MARGIN = 0.1  # how far past the training range, as a share of its width, a value is still accepted
TABLE = "gold.scoring_refusals"
OUTSIDE = "_outside_training_range"  # the column scoring carries the out-of-range inputs in


def ranges(df: DataFrame, inputs: list[str]) -> dict[str, list[float]]:
    """input -> [lowest, highest] over ``df``'s rows (inputs never observed are left out)."""
    if not inputs:
        return {}
    row = df.agg(*[F.min(c).alias(f"lo_{i}") for i, c in enumerate(inputs)],
                 *[F.max(c).alias(f"hi_{i}") for i, c in enumerate(inputs)]).first()  # fmt: skip
    return {
        c: [float(row[f"lo_{i}"]), float(row[f"hi_{i}"])]
        for i, c in enumerate(inputs)
        if row[f"lo_{i}"] is not None
    }


def outside(accepts: dict[str, list[float]]) -> Column:
    """The inputs of a row beyond the accepted ranges, as ``name = value`` (an empty array when
    every input is in scope)."""
    flags = []
    for name, (lo, hi) in sorted(accepts.items()):
        if hi == lo:  # constant in training: no model can have learnt from it, any value is ignored
            continue
        slack = MARGIN * (hi - lo)
        value = F.col(f"`{name}`").cast("double")
        beyond = (value < lo - slack) | (value > hi + slack)
        flags.append(F.when(beyond, F.concat(F.lit(f"{name} = "), F.format_number(value, 2))))
    if not flags:
        return F.array().cast("array<string>")
    return F.filter(F.array(*flags), lambda flag: flag.isNotNull())


def summary(refusals: DataFrame, top: int = 3) -> tuple[int, str]:
    """(patients refused, one line naming the inputs that refused most) of a scoring's refusals,
    in one aggregation: each refusal counts once under ``*`` and once under each input it names."""
    names = F.transform("inputs", lambda i: F.regexp_extract(i, r"^(.*) = ", 1))
    counts = {
        r.input: r["count"]
        for r in refusals.select(F.explode(F.array_union(F.array(F.lit("*")), names)).alias("input"))
        .groupBy("input")
        .count()
        .collect()  # one row per input the model has, at most
    }
    refused = counts.pop("*", 0)
    if not refused:
        return 0, "every patient within the training range of every input"
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    spread = ", ".join(f"{name} {n:,}" for name, n in ranked)
    return (
        refused,
        f"refused {refused:,} patient(s) with inputs outside the training range ({spread}) -> {TABLE}",
    )
