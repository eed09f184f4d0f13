"""Patient event sequences for sequence models: ``gold.sequence_vocabulary`` and ``gold.sequences``.

A patient's record as the time-ordered tokens of what happened to them (BEHRT, Med-BERT): each
condition from its onset, medication and procedure from its start, encounter once it has ended
(its class) and lab value when it was measured (the quantile bin of that lab's values). One
token per kind of event per day: a panel measured twice that morning is one event.

**Point in time.** A sequence belongs to an index (``patient_key``, ``index_id``, ``index_time``)
and holds only events strictly before ``index_time``, the rule of the point-in-time features
(:mod:`ehrlake.features.pointintime`): the indexes of ``gold.features_patient`` and
``gold.features_encounter`` (so a sequence joins ``gold.labels`` exactly as the features do) and
one index ``all`` per patient at the data's end, the whole record, for pretraining without labels.

**Vocabulary.** Built from every event in silver: a token is kept where at least ``min_patients``
patients have it; a rarer one becomes its parent code (ICD: the category), else its kind's
unknown token. Rare codes are also the ones that identify people, hence the aggregates' k. Lab
bins are the quantiles of each lab's values over all patients (labels are never read). A model
records the vocabulary table's version it was trained with; a new hospital's sequences are built
with that vocabulary (:func:`build` takes it), never with one of their own.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from ehrlake.config import build as build_config
from ehrlake.config import read_yaml
from ehrlake.encounters import data_clock, data_end
from ehrlake.errors import ConfigError, EhrlakeError
from ehrlake.features.pointintime import INDEX, silver
from ehrlake.home import CONF
from ehrlake.lake import WriteMode

SETTINGS_FILE = CONF / "sequences.yaml"
VOCABULARY, SEQUENCES = "gold.sequence_vocabulary", "gold.sequences"
JOB = "sequences"
PAD, MASK, CLS, UNKNOWN = "[PAD]", "[MASK]", "[CLS]", "[UNK]"
SPECIAL = (PAD, MASK, CLS, UNKNOWN)  # ids 0-3, in this order
# kind -> silver entity, the time it counts from, the token's text (system:code, or the class); SQL
CODED = "concat_ws(':', code_system, code)"
KINDS = {
    "condition": ("condition", "onset_at", CODED),
    "medication": ("medication", "start_at", CODED),
    "procedure": ("procedure", "start_at", CODED),
    "encounter": ("encounter", "coalesce(end_at, start_at)", "lower(encounter_class)"),
    "lab": ("observation", "effective_at", CODED),
}
ALL = "all"  # the index of a patient's whole record


@dataclass(frozen=True)
class Settings:
    max_length: int = 256
    min_patients: int = 11
    lab_bins: int = 5
    parents: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        if self.max_length < 2 or self.min_patients < 1 or not 1 <= self.lab_bins <= 20:
            raise ConfigError("sequences: max_length >= 2, min_patients >= 1 and lab_bins 1-20")


def load_settings(path: str | Path | None = None) -> Settings:
    path = Path(path or SETTINGS_FILE)
    return build_config(Settings, read_yaml(path), path.name)


def unknown(kind: str) -> str:
    return f"{kind}:?"


def events(lake) -> DataFrame:
    """Every event of silver: ``patient_key``, ``at``, ``kind``, ``text`` (system:code or class)
    and ``value`` (labs' numbers), one per patient, kind, text and day (the earliest time). Events
    dated in the future are left out, unless the lake's clock is a date-shifted extract's own
    (:func:`~ehrlake.encounters.data_clock`), where every event is."""
    parts = []
    shifted = data_clock(lake)[1]
    for kind, (entity, at, text) in KINDS.items():
        df = silver(lake, entity)
        flags = F.coalesce(F.col("quality_flags"), F.array())
        if not shifted:
            df = df.where(~F.array_contains(flags, "future_date"))
        value = F.lit(None).cast("double")
        if kind == "lab":  # an implausible value is no value (as the features have it)
            value = F.when(~F.array_contains(flags, "implausible_value"), F.col("value_number"))
        parts.append(
            df.select(
                "patient_key",
                F.expr(at).alias("at"),
                F.lit(kind).alias("kind"),
                F.expr(text).alias("text"),
                value.alias("value"),
            )
        )
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    union = union.where(F.col("patient_key").isNotNull() & F.col("at").isNotNull() & (F.col("text") != ""))
    # several values of one lab on one day: the day's last one
    return union.groupBy("patient_key", "kind", "text", F.to_date("at").alias("day")).agg(
        F.min("at").alias("at"), F.max_by("value", "at").alias("value")
    )


def _binned(ev: DataFrame, edges: DataFrame) -> DataFrame:
    """``token``: kind:text, labs with ``:q<bin>`` where their lab has bin edges and a value."""
    bin_ = F.aggregate("edges", F.lit(1), lambda acc, e: acc + (F.col("value") > e).cast("int"))
    joined = ev.join(F.broadcast(edges), ["kind", "text"], "left")
    lab_bin = F.when(F.col("edges").isNotNull() & F.col("value").isNotNull(), F.concat(F.lit(":q"), bin_))
    token = F.concat(F.concat_ws(":", "kind", "text"), F.coalesce(lab_bin, F.lit("")))
    return joined.withColumn("token", token)


def vocabulary(lake, settings: Settings) -> DataFrame:
    """The vocabulary of silver as it is now: ``id``, ``token``, ``kind``, ``patients`` (null for
    the special and unknown tokens), ``edges`` (a lab's bin edges, on each of its bin tokens)."""
    ev = events(lake)
    k = settings.min_patients
    probabilities = [i / settings.lab_bins for i in range(1, settings.lab_bins)]
    edges = (
        ev.where((F.col("kind") == "lab") & F.col("value").isNotNull())
        .groupBy("kind", "text")
        .agg(
            F.countDistinct("patient_key").alias("n"),
            F.percentile_approx("value", probabilities, 10000).alias("edges"),
        )
        .where(F.col("n") >= k)
        .select("kind", "text", F.array_distinct("edges").alias("edges"))
    )
    if not probabilities:
        edges = edges.limit(0)
    tokens = _binned(ev, edges)
    counted = tokens.groupBy("token", "kind").agg(F.countDistinct("patient_key").alias("patients"))
    kept = counted.where(F.col("patients") >= k)
    # the rare ones, as their parents (ICD categories), kept where those are common enough
    parent = _parent(tokens, settings)
    parents = (
        tokens.join(kept.select("token"), "token", "left_anti")
        .select("patient_key", "kind", parent.alias("token"))
        .where(F.col("token").isNotNull())
        .groupBy("token", "kind")
        .agg(F.countDistinct("patient_key").alias("patients"))
        .where(F.col("patients") >= k)
        .join(kept.select("token"), "token", "left_anti")
    )
    common = kept.unionByName(parents).join(
        F.broadcast(edges.select(F.concat_ws(":", "kind", "text").alias("lab"), "edges")),
        F.regexp_replace("token", r":q\d+$", "") == F.col("lab"),
        "left",
    )
    common = common.select(
        "token", "kind", "patients", F.when(F.col("token").rlike(r":q\d+$"), F.col("edges")).alias("edges")
    )
    fixed = [(t, "special") for t in SPECIAL] + [(unknown(kind), kind) for kind in KINDS]
    head = lake.spark.createDataFrame(
        [(i, t, kind, None, None) for i, (t, kind) in enumerate(fixed)],
        "id int, token string, kind string, patients long, edges array<double>",
    )
    # ids after the fixed ones: most common first, ties by token, the same ids on every rebuild
    order = Window.orderBy(F.col("patients").desc(), F.col("token"))
    ranked = common.select((F.row_number().over(order) + len(fixed) - 1).cast("int").alias("id"), "*")
    return head.unionByName(ranked.select(*head.columns))


def _parent(tokens: DataFrame, settings: Settings):
    """A token's parent: ``kind:system:<prefix of code>`` for the systems of ``settings.parents``."""
    parts = F.split("text", ":", 2)  # system, code; an encounter's class has no code
    system, code = parts.getItem(0), F.regexp_replace(F.try_element_at(parts, F.lit(2)), r"\.", "")
    out = F.lit(None).cast("string")
    for name, length in settings.parents.items():
        out = F.when(
            (system == name) & (F.length(code) > length),
            F.concat_ws(":", "kind", F.lit(name), F.substring(code, 1, length)),
        ).otherwise(out)
    return out


def build(lake, index: DataFrame, vocab: DataFrame, settings: Settings) -> DataFrame:
    """Sequences of ``index`` (``patient_key``, ``index_id``, ``index_time``) in ``vocab``'s ids:
    the last ``max_length`` tokens before each index time, oldest first, with the age at each, the
    days before the index and the days since the previous token. Rows of ``index`` whose patient
    had nothing before the index time have no sequence."""
    ev = events(lake).join(F.broadcast(index.select("patient_key").distinct()), "patient_key", "left_semi")
    edges = vocab.where(F.col("edges").isNotNull()).select(
        F.split("token", ":", 2).getItem(0).alias("kind"),
        F.regexp_replace(F.try_element_at(F.split("token", ":", 2), F.lit(2)), r":q\d+$", "").alias("text"),
        "edges",
    )
    tokens = _binned(ev, edges.dropDuplicates(["kind", "text"]))
    ids = vocab.select("token", "id")
    parent_ids = ids.withColumnsRenamed({"token": "_parent", "id": "_parent_id"})
    unknowns = vocab.where(F.col("token").endswith(":?")).select(
        F.col("kind").alias("_kind"), F.col("id").alias("_unknown")
    )
    parent = _parent(tokens, settings)
    mapped = (
        tokens.withColumn("_parent", parent)
        .join(F.broadcast(ids), "token", "left")
        .join(F.broadcast(parent_ids), "_parent", "left")
        .join(F.broadcast(unknowns), F.col("kind") == F.col("_kind"), "left")
        .select("patient_key", "at", F.coalesce("id", "_parent_id", "_unknown").alias("token_id"))
    )
    people = silver(lake, "patient").select("patient_key", "birth_year")
    before = (
        index.select(*INDEX, "index_time")
        .join(mapped, "patient_key")
        .where(F.col("at") < F.col("index_time"))
        .groupBy(*INDEX, "index_time")
        .agg(F.sort_array(F.collect_list(F.struct("at", "token_id"))).alias("_events"))
    )
    n = settings.max_length
    kept = F.slice("_events", F.greatest(F.size("_events") - n + 1, F.lit(1)), n)
    seq = before.select(*INDEX, "index_time", kept.alias("_kept"), (F.size("_events") > n).alias("truncated"))
    days = lambda later, earlier: F.floor(  # noqa: E731
        (F.unix_timestamp(later) - F.unix_timestamp(earlier)) / 86400
    ).cast("int")
    return seq.join(people, "patient_key", "left").select(
        *INDEX,
        "index_time",
        F.transform("_kept", lambda e: e["token_id"]).alias("token_ids"),
        F.transform("_kept", lambda e: (F.year(e["at"]) - F.col("birth_year")).cast("int")).alias("ages"),
        F.transform("_kept", lambda e: days(F.col("index_time"), e["at"])).alias("days_before_index"),
        F.transform(
            "_kept",
            lambda e, i: F.when(i == 0, F.lit(0)).otherwise(days(e["at"], F.col("_kept")[i - 1]["at"])),
        ).alias("gaps"),
        F.size("_kept").alias("length"),
        "truncated",
    )


def displays(lake, patients: DataFrame) -> DataFrame:
    """What the coded events of ``patients`` (a frame of ``patient_key``) are called in their
    records: ``kind``, ``text`` (as in :func:`events`), ``display`` (the most frequent name)."""
    parts = []
    for kind, (entity, _, text) in KINDS.items():
        if kind == "encounter":  # its token is its class: no other name
            continue
        df = silver(lake, entity).join(F.broadcast(patients), "patient_key", "left_semi")
        parts.append(df.select(F.lit(kind).alias("kind"), F.expr(text).alias("text"), "display"))
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    named = union.where(F.col("display").isNotNull() & (F.col("display") != ""))
    return named.groupBy("kind", "text").agg(F.mode("display").alias("display"))


def indexes(lake) -> DataFrame:
    """The features' indexes (``gold.features_patient``: patient x as-of date;
    ``gold.features_encounter``: an inpatient stay at discharge) and each patient's ``all`` index
    at the data's end (a day after its last encounter started)."""
    end = data_end(lake)
    if end is None:
        raise EhrlakeError("silver.encounter has no dated encounters: cannot place the data's end")
    out = silver(lake, "patient").select(
        "patient_key", F.lit(ALL).alias("index_id"), F.lit(end + dt.timedelta(days=1)).alias("index_time")
    )
    for table in ("gold.features_patient", "gold.features_encounter"):
        if lake.exists(table):
            rows = lake.read(table).where(F.col("index_time").isNotNull())
            out = out.unionByName(rows.select(*INDEX, "index_time"))
    return out


def vocabulary_fingerprint(lake, version: int | None = None) -> str:
    """SHA-256 of the vocabulary's (id, token) pairs: what a model trained on token ids depends on.
    Unlike the table's version, it stays put through maintenance commits (OPTIMIZE, properties)
    and through a rebuild that gives the same tokens the same ids."""
    pairs = lake.read(VOCABULARY, version=version).select(F.concat_ws("=", "id", "token").alias("pair"))
    return pairs.agg(F.sha2(F.concat_ws("\n", F.sort_array(F.collect_list("pair"))), 256)).first()[0]


def run(lake, role: str | None = None, settings: Settings | None = None) -> dict:
    """Rebuild the vocabulary and the sequences from silver (and the features' indexes); a rerun
    gives the same tables. Returns counts for the job's report."""
    settings = settings or load_settings()
    if not lake.exists("silver.patient") or not lake.exists("silver.encounter"):
        raise EhrlakeError("no silver tables yet: run ehrlake clean first")
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    commit = {"ehrlakeJob": JOB, "ehrlakeRunId": run_id}
    with lake.security.job(JOB, ["gold"], role, run_id) as (_, audit):
        lake.write(vocabulary(lake, settings), VOCABULARY, mode=WriteMode.OVERWRITE, commit_info=commit)
        vocab = lake.read(VOCABULARY)
        version = lake.version(VOCABULARY)
        seq = build(lake, indexes(lake), vocab, settings).withColumn("vocabulary_version", F.lit(version))
        lake.write(seq, SEQUENCES, mode=WriteMode.OVERWRITE, commit_info=commit)
        stats = _stats(lake.read(SEQUENCES), vocab)
        audit.append((VOCABULARY, f"{stats['vocabulary']} tokens"))
        audit.append((SEQUENCES, f"{stats['sequences']} sequences"))
    return {**stats, "vocabulary_version": version}


def _stats(seq: DataFrame, vocab: DataFrame) -> dict:
    unknown_ids = [r.id for r in vocab.where(F.col("token").endswith(":?")).select("id").collect()]
    tokens = seq.select(F.explode("token_ids").alias("id"))
    row = seq.agg(
        F.count("*").alias("sequences"),
        F.sum((F.col("index_id") == ALL).cast("int")).alias("whole"),
        F.percentile_approx("length", 0.5).alias("median"),
        F.max("length").alias("longest"),
        F.avg(F.col("truncated").cast("int")).alias("truncated"),
    ).first()
    total = tokens.count()
    unknown_share = tokens.where(F.col("id").isin(unknown_ids)).count() / max(1, total)
    return {
        "sequences": int(row.sequences),
        "patients": int(row.whole or 0),
        "vocabulary": vocab.count(),
        "median_length": int(row.median or 0),
        "longest": int(row.longest or 0),
        "truncated_share": float(row.truncated or 0.0),
        "unknown_share": unknown_share,
        "tokens": total,
    }
