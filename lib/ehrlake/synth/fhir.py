"""The generated population as FHIR R4: bulk NDJSON (one file set per resource type) or Bundles.

The generator builds Synthea-CSV-shaped frames (``synth/amplify.py``); this module turns each row
into a FHIR resource with ``to_json`` in the JVM (no Python per row). References use the same
rewritten ids (``Patient/<id>``, ``Encounter/<id>``, ``Organization/<id>``), so they stay valid across
resources. Rows without an id in Synthea CSV (conditions, observations, ...) get a deterministic
UUID from their content, so a seed still gives byte-identical files.

Faults at ``fault_rate`` (the frame-level ones of the CSV writer, missing ids and impossible dates,
plus truncated JSON here) are counted in the manifest like the CSV ones.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.clean.codes import lookup
from ehrlake.synth.values import BAD_DATE, unit, uuid

NDJSON = "fhir-ndjson"
BUNDLES = "fhir-bundles"
PATIENTS_PER_BUNDLE = 50

RESOURCE_TYPES = {
    "patients": "Patient",
    "organizations": "Organization",
    "encounters": "Encounter",
    "conditions": "Condition",
    "observations": "Observation",
    "medications": "MedicationRequest",
    "procedures": "Procedure",
    "immunizations": "Immunization",
    "allergies": "AllergyIntolerance",
}
ACT_CODES = {
    "inpatient": "IMP",
    "emergency": "EMER",
    "ambulatory": "AMB",
    "wellness": "AMB",
    "outpatient": "AMB",
    "urgentcare": "AMB",
    "home": "HH",
    "virtual": "VR",
}
OPTIONAL = (
    "system",
    "county",
    "zip",
    "country",
    "marital",
    "address",
    "category",
    "type",
    "units",
    "stop",
    "organization",
    "encounter",
    "deathdate",
    "first",
    "last",
    "name",
    "city",
    "state",
)
SYSTEMS = {
    "SNOMED-CT": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "LOINC": "http://loinc.org",
}


def _ref(kind: str, col: str) -> Column:
    return F.when(
        F.col(col).isNotNull() & (F.col(col) != ""),
        F.struct(F.concat(F.lit(f"{kind}/"), F.col(col)).alias("reference")),
    )


def _concept(system: str | Column, code: str = "code", display: str = "description") -> Column:
    system_col = F.lit(system) if isinstance(system, str) else system
    return F.struct(
        F.array(
            F.struct(system_col.alias("system"), F.col(code).alias("code"), F.col(display).alias("display"))
        ).alias("coding"),
        F.col(display).alias("text"),
    )


def _with_content_id(seed: int, name: str, df: DataFrame) -> DataFrame:
    """An id from the row's content and its occurrence among identical rows (exports repeat some
    rows verbatim; each still becomes its own resource, as in Synthea's own FHIR export)."""
    from pyspark.sql import Window

    content = F.concat_ws("|", *[F.coalesce(F.col(c).cast("string"), F.lit("")) for c in df.columns])
    df = df.withColumn("_content", content)
    nth = F.row_number().over(Window.partitionBy("_content").orderBy("_content"))
    return df.withColumn("id", uuid(str(seed), f"fhir:{name}", F.col("_content"), nth.cast("string"))).drop(
        "_content"
    )


def resources(name: str, df: DataFrame, seed: int) -> DataFrame:
    """(patient, resource) rows: ``resource`` is one FHIR resource as JSON; ``patient`` its subject
    (null for organizations)."""
    rtype = RESOURCE_TYPES[name]
    # template exports differ by Synthea version (older ones lack e.g. conditions.system): absent -> null
    df = df.select("*", *[F.lit(None).cast("string").alias(n) for n in OPTIONAL if n not in df.columns])

    if "id" not in df.columns:
        df = _with_content_id(seed, name, df)
    base = [F.lit(rtype).alias("resourceType"), F.col("id").alias("id")]
    subject = _ref("Patient", "patient").alias("subject")
    encounter = _ref("Encounter", "encounter").alias("encounter")
    if name == "patients":
        gender = (
            F.when(F.col("gender") == "F", "female").when(F.col("gender") == "M", "male").otherwise("unknown")
        )
        body = [
            F.array(
                F.struct(
                    F.lit("https://github.com/synthetichealth/synthea").alias("system"),
                    F.col("id").alias("value"),
                )
            ).alias("identifier"),
            F.array(
                F.struct(
                    F.lit("official").alias("use"),
                    F.col("last").alias("family"),
                    F.array(F.col("first")).alias("given"),
                )
            ).alias("name"),
            gender.alias("gender"),
            F.col("birthdate").alias("birthDate"),
            F.col("deathdate").alias("deceasedDateTime"),
            F.array(
                F.struct(
                    F.array(F.col("address")).alias("line"),
                    F.col("city").alias("city"),
                    F.col("county").alias("district"),
                    F.col("state").alias("state"),
                    F.col("zip").alias("postalCode"),
                    F.col("country").alias("country"),
                )
            ).alias("address"),
            F.struct(F.array(F.struct(F.col("marital").alias("code"))).alias("coding")).alias(
                "maritalStatus"
            ),
        ]
        patient = F.col("id")
    elif name == "organizations":
        body = [
            F.col("name").alias("name"),
            F.lit(True).alias("active"),
            F.array(
                F.struct(
                    F.array(F.col("address")).alias("line"),
                    F.col("city").alias("city"),
                    F.col("state").alias("state"),
                    F.col("zip").alias("postalCode"),
                )
            ).alias("address"),
        ]
        patient = F.lit(None).cast("string")
    elif name == "encounters":
        body = [
            F.lit("finished").alias("status"),
            F.struct(
                F.lit("http://terminology.hl7.org/CodeSystem/v3-ActCode").alias("system"),
                lookup(ACT_CODES, F.col("encounterclass")).alias("code"),
            ).alias("class"),
            F.array(_concept("http://snomed.info/sct")).alias("type"),
            subject,
            F.struct(F.col("start").alias("start"), F.col("stop").alias("end")).alias("period"),
            _ref("Organization", "organization").alias("serviceProvider"),
        ]
        patient = F.col("patient")
    elif name == "conditions":
        body = [
            F.array(
                _concept("http://terminology.hl7.org/CodeSystem/condition-category", "_cat", "_cat")
            ).alias("category"),
            _concept(lookup(SYSTEMS, F.coalesce(F.col("system"), F.lit("SNOMED-CT")))),
            subject,
            encounter,
            F.col("start").alias("onsetDateTime"),
            F.col("stop").alias("abatementDateTime"),
        ]
        df = df.withColumn("_cat", F.lit("encounter-diagnosis"))
        patient = F.col("patient")
    elif name == "observations":
        numeric = F.col("type") == "numeric"
        body = [
            F.lit("final").alias("status"),
            F.array(F.struct(F.array(F.struct(F.col("category").alias("code"))).alias("coding"))).alias(
                "category"
            ),
            _concept("http://loinc.org"),
            subject,
            encounter,
            F.col("date").alias("effectiveDateTime"),
            F.when(
                numeric,
                F.struct(
                    F.col("value").try_cast("double").alias("value"),
                    F.col("units").alias("unit"),
                    F.lit("http://unitsofmeasure.org").alias("system"),
                    F.col("units").alias("code"),
                ),
            ).alias("valueQuantity"),
            F.when(~numeric, F.col("value")).alias("valueString"),
        ]
        patient = F.col("patient")
    elif name == "medications":
        body = [
            F.when(F.col("stop").isNull(), "active").otherwise("stopped").alias("status"),
            F.lit("order").alias("intent"),
            _concept("http://www.nlm.nih.gov/research/umls/rxnorm").alias("medicationCodeableConcept"),
            subject,
            encounter,
            F.col("start").alias("authoredOn"),
        ]
        patient = F.col("patient")
    elif name == "procedures":
        body = [
            F.lit("completed").alias("status"),
            _concept("http://snomed.info/sct"),
            subject,
            encounter,
            F.struct(F.col("start").alias("start"), F.col("stop").alias("end")).alias("performedPeriod"),
        ]
        patient = F.col("patient")
    elif name == "immunizations":
        body = [
            F.lit("completed").alias("status"),
            _concept("http://hl7.org/fhir/sid/cvx").alias("vaccineCode"),
            _ref("Patient", "patient").alias("patient"),
            encounter,
            F.col("date").alias("occurrenceDateTime"),
            F.lit(True).alias("primarySource"),
        ]
        patient = F.col("patient")
    else:  # allergies
        body = [
            _concept(lookup(SYSTEMS, F.coalesce(F.col("system"), F.lit("SNOMED-CT")))),
            _ref("Patient", "patient").alias("patient"),
            encounter,
            F.col("type").alias("type"),
            F.array(F.col("category")).alias("category"),
            F.col("start").alias("onsetDateTime"),
        ]
        patient = F.col("patient")
    return df.select(patient.alias("patient"), F.to_json(F.struct(*base, *body)).alias("resource"))


def truncate(df: DataFrame, seed: int, name: str, rate: float, held) -> tuple[DataFrame, int]:
    """Cut a share of the JSON texts in half (the "bad JSON" fault of a broken export); the frame
    is cached in ``held`` (:class:`ehrlake.synth.amplify.Held`), which releases it after writing."""

    if rate <= 0:
        return df, 0

    # at most one fault per record, so the manifest's counts are exactly what ingest quarantines
    damaged = F.col("resource").contains('"id":""') | F.col("resource").contains(BAD_DATE)
    hit = (unit(seed, f"fault-json:{name}", F.col("resource")) < rate) & ~damaged
    df = held.cache(
        df.withColumn("_bad", hit).withColumn(
            "resource",
            F.when(
                F.col("_bad"), F.expr("substring(resource, 1, CAST(length(resource) / 2 AS INT))")
            ).otherwise(F.col("resource")),
        )
    )
    count = df.where("_bad").count()
    return df.drop("_bad"), count


def write_ndjson(df: DataFrame, out: str, name: str, files: int) -> None:
    """``<out>/<ResourceType>.part-NNNNN.ndjson.gz``, lines in a fixed order."""
    staged = os.path.join(out, f"_{name}")
    df.select("resource").repartition(files, "resource").sortWithinPartitions("resource").write.text(
        staged, compression="gzip"
    )
    for i, part in enumerate(sorted(glob.glob(os.path.join(staged, "part-*.txt.gz")))):
        os.replace(part, os.path.join(out, f"{RESOURCE_TYPES[name]}.part-{i:05d}.ndjson.gz"))
    shutil.rmtree(staged)  # _SUCCESS and checksum files


def write_bundles(frames: dict[str, DataFrame], out: str, patients: int) -> int:
    """One ``collection`` Bundle per group of patients (their resources), plus one Bundle of the
    organizations: ``<out>/bundle-NNNNN.json.gz``. Returns the number of bundle files."""
    per_patient = None
    for name, df in frames.items():
        if name == "organizations":
            continue
        part = df.where(F.col("patient").isNotNull())
        per_patient = part if per_patient is None else per_patient.unionByName(part)
    groups = max(1, (patients + PATIENTS_PER_BUNDLE - 1) // PATIENTS_PER_BUNDLE)
    bucket = F.pmod(F.xxhash64("patient"), F.lit(groups))
    bundles = (
        per_patient.withColumn("bucket", bucket)
        .groupBy("bucket")
        .agg(F.array_sort(F.collect_list("resource")).alias("resources"))
        .withColumn("bucket", F.col("bucket").cast("long"))
    )
    orgs = frames.get("organizations")
    if orgs is not None:
        bundles = bundles.unionByName(
            orgs.agg(F.array_sort(F.collect_list("resource")).alias("resources")).select(
                F.lit(-1).cast("long").alias("bucket"), "resources"
            )
        )

    def write(rows):
        import pandas as pd

        written = []
        for batch in rows:
            for bucket_id, resources in zip(batch["bucket"], batch["resources"], strict=True):
                # resources are JSON texts already: splice them, do not re-parse
                entries = ",".join('{"resource":' + r + "}" for r in resources)
                text = '{"resourceType":"Bundle","type":"collection","entry":[' + entries + "]}"
                number = "orgs" if bucket_id < 0 else f"{bucket_id:05d}"
                with gzip.open(os.path.join(out, f"bundle-{number}.json.gz"), "wt", encoding="utf-8") as fh:
                    fh.write(text)
                written.append(bucket_id)
        yield pd.DataFrame({"bucket": written})

    return bundles.mapInPandas(write, "bucket long").count()
