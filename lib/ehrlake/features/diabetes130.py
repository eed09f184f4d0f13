"""Features and label of the Diabetes 130-US extract, from its own rows.

The extract has no dates, so silver's point-in-time features cannot apply; instead each encounter
row already describes the stay and the patient's prior year (``number_inpatient`` etc. count visits
*before* the encounter, so they are known at discharge). The encoding follows Strack et al. 2014:
primary diagnosis grouped by ICD-9 chapter, HbA1c and glucose results, medication changes, the
admission and discharge categories. Race is kept for subgroup metrics but is not a model input.
The patient's earlier encounters in the extract add :data:`HISTORY` (issue 21): the extract links
them by ``patient_nbr`` and ``encounter_id`` orders them.

The same function reads a bronze table (``bronze.diabetes130_encounters``) or a file of the same
format read with :func:`read_file` (``ehrlake evaluate --input``), so a model is evaluated on new
data through exactly the code it was trained with.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from ehrlake.eda.aggregates import UNKNOWN
from ehrlake.errors import EhrlakeError
from ehrlake.ingest.csv_tables import canonical

TASK = "diabetes130_readmission_30d"
EXCLUDED_DISPOSITIONS = ("11", "13", "14", "19", "20", "21")  # expired or hospice
DRUGS = (
    "metformin", "repaglinide", "nateglinide", "chlorpropamide", "glimepiride", "acetohexamide",
    "glipizide", "glyburide", "tolbutamide", "pioglitazone", "rosiglitazone", "acarbose", "miglitol",
    "troglitazone", "tolazamide", "examide", "citoglipton", "insulin", "glyburide_metformin",
    "glipizide_metformin", "glimepiride_pioglitazone", "metformin_rosiglitazone", "metformin_pioglitazone",
)  # fmt: skip
COUNTS = (
    "time_in_hospital", "num_lab_procedures", "num_procedures", "num_medications", "number_outpatient",
    "number_emergency", "number_inpatient", "number_diagnoses",
)  # fmt: skip
# ICD-9-CM chapters of the primary diagnosis (Strack et al., table 2)
DIAGNOSIS_GROUPS = {
    "circulatory": [(390, 460), (785, 786)],
    "respiratory": [(460, 520), (786, 787)],
    "digestive": [(520, 580), (787, 788)],
    "injury": [(800, 1000)],
    "musculoskeletal": [(710, 740)],
    "genitourinary": [(580, 630), (788, 789)],
    "neoplasms": [(140, 240)],
}
SPECIALTIES = {
    "specialty_internal_medicine": ["InternalMedicine"],
    "specialty_cardiology": ["Cardiology"],
    "specialty_surgery": ["Surgery-General", "Surgery-Cardiovascular/Thoracic", "Orthopedics"],
    "specialty_family_practice": ["Family/GeneralPractice"],
    "specialty_emergency": ["Emergency/Trauma"],
}

DESCRIPTIONS = {
    "age_years": "age (middle of the recorded 10-year band)",
    "sex_female": "sex recorded as female",
    "time_in_hospital": "days in hospital on this stay",
    "num_lab_procedures": "lab tests on this stay",
    "num_procedures": "procedures on this stay",
    "num_medications": "distinct medications on this stay",
    "number_outpatient": "outpatient visits in the year before",
    "number_emergency": "emergency visits in the year before",
    "number_inpatient": "inpatient stays in the year before",
    "number_diagnoses": "diagnoses recorded on this stay",
    "prior_visits": "all visits in the year before",
    "admission_emergency": "admitted as an emergency",
    "admission_elective": "elective admission",
    "source_emergency_room": "admitted from the emergency room",
    "source_transfer": "transferred in from another facility",
    "discharged_home": "discharged home",
    "discharged_home_health": "discharged home with home health care",
    "discharged_facility": "discharged to a nursing / rehab / other inpatient facility",
    "left_against_advice": "left against medical advice",
    "primary_diabetes": "primary diagnosis: diabetes",
    **{f"primary_{g}": f"primary diagnosis: {g} disease" for g in DIAGNOSIS_GROUPS},
    "any_heart_failure": "heart failure among the diagnoses",
    "any_renal": "kidney disease among the diagnoses",
    "a1c_measured": "HbA1c measured",
    "a1c_high": "HbA1c above 7%",
    "glucose_measured": "max glucose measured",
    "glucose_high": "max glucose above 200 mg/dL",
    "insulin_given": "on insulin",
    "medications_given": "diabetes medications given",
    "medications_changed": "diabetes medications changed (up or down)",
    "medication_change": "any change of diabetes medication",
    "diabetes_medication": "any diabetes medication prescribed",
    "payer_missing": "payer not recorded",
    **{name: f"seen by {values[0]}" for name, values in SPECIALTIES.items()},
}
# the patient's earlier encounters in the extract (linked by patient_nbr, ordered by encounter_id):
# known at this stay's discharge, since each earlier stay's first readmission is this stay or before it
HISTORY = {
    "earlier_stays": "earlier stays of the patient in the extract",
    "earlier_readmitted_30d": "earlier stays followed by a readmission within 30 days",
    "earlier_readmitted": "earlier stays followed by any readmission",
    "previous_readmitted_30d": "this stay began within 30 days of the previous one (its readmission)",
    "earlier_days_in_hospital": "days in hospital on earlier stays",
    "earlier_emergency_admissions": "earlier stays admitted as an emergency",
    "earlier_heart_failure": "heart failure on an earlier stay",
    "earlier_renal": "kidney disease on an earlier stay",
    "earlier_insulin": "on insulin on an earlier stay",
}
DESCRIPTIONS.update(HISTORY)
FEATURES = list(DESCRIPTIONS)
# many-valued codes kept as they are in the feature table; a model reads each as its readmission
# rate, target-encoded inside its training folds (ehrlake.models.target_encoding), never here
CODES = {
    "diag_1": "primary diagnosis code",
    "diag_2": "secondary diagnosis code",
    "diag_3": "additional diagnosis code",
    "medical_specialty": "admitting physician's specialty",
    "payer_code": "payer",
    "admission_source_id": "admission source",
    "discharge_disposition_id": "discharge disposition",
    "admission_type_id": "admission type",
}


def _icd9_number(code: Column) -> Column:
    """The numeric ICD-9 category (V/E codes: null)."""
    return F.when(code.rlike(r"^[0-9]"), code.cast("double"))


def _in_ranges(value: Column, ranges) -> Column:
    out = F.lit(False)
    for low, high in ranges:
        out = out | ((value >= low) & (value < high))
    return F.coalesce(out, F.lit(False))


def build(rows: DataFrame) -> DataFrame:
    """Extract rows (canonical column names) -> (patient_key, index_id, attributes, features, codes, label,
    excluded)."""
    missing = [
        c for c in ("encounter_id", "readmitted", "age", "discharge_disposition_id") if c not in rows.columns
    ]
    if missing:
        raise EhrlakeError(f"not a Diabetes 130-US extract: no column(s) {missing}")
    s = lambda c: F.col(c).cast("string")  # noqa: E731
    primary = _icd9_number(s("diag_1"))
    diags = [s(f"diag_{i}") for i in (1, 2, 3)]
    any_diag = lambda pattern: F.greatest(*[F.coalesce(d.rlike(pattern), F.lit(False)) for d in diags])  # noqa: E731
    drug = lambda d: F.coalesce(s(d), F.lit("No"))  # noqa: E731
    age_low = F.regexp_extract(s("age"), r"\[(\d+)-", 1).cast("double")
    disposition = s("discharge_disposition_id")
    admission = s("admission_type_id")
    source = s("admission_source_id")
    features: dict[str, Column] = {
        "age_years": age_low + 5,
        "sex_female": s("gender") == "Female",
        **{c: F.coalesce(F.col(c).cast("double"), F.lit(0.0)) for c in COUNTS},
        "prior_visits": sum(F.coalesce(F.col(c).cast("double"), F.lit(0.0)) for c in COUNTS[4:7]),
        "admission_emergency": admission.isin("1", "2", "7"),
        "admission_elective": admission == "3",
        "source_emergency_room": source == "7",
        "source_transfer": source.isin("4", "5", "6", "10", "18", "22", "25", "26"),
        "discharged_home": disposition == "1",
        "discharged_home_health": disposition.isin("6", "8"),
        "discharged_facility": disposition.isin(
            "2", "3", "4", "5", "15", "22", "23", "24", "27", "28", "29", "30"
        ),
        "left_against_advice": disposition == "7",
        "primary_diabetes": s("diag_1").startswith("250"),
        **{f"primary_{g}": _in_ranges(primary, r) for g, r in DIAGNOSIS_GROUPS.items()},
        "any_heart_failure": any_diag(r"^428"),
        "any_renal": any_diag(r"^(585|586|403|404)"),
        "a1c_measured": s("a1cresult").isin(">7", ">8", "Norm"),
        "a1c_high": s("a1cresult").isin(">7", ">8"),
        "glucose_measured": s("max_glu_serum").isin(">200", ">300", "Norm"),
        "glucose_high": s("max_glu_serum").isin(">200", ">300"),
        "insulin_given": drug("insulin") != "No",
        "medications_given": sum((drug(d) != "No").cast("int") for d in DRUGS if d in rows.columns),
        "medications_changed": sum(
            drug(d).isin("Up", "Down").cast("int") for d in DRUGS if d in rows.columns
        ),
        "medication_change": s("change") == "Ch",
        "diabetes_medication": s("diabetesmed") == "Yes",
        "payer_missing": F.col("payer_code").isNull() if "payer_code" in rows.columns else F.lit(True),
        **{name: s("medical_specialty").isin(*values) for name, values in SPECIALTIES.items()},
    }
    features.update(_history(rows, features))
    excluded = F.when(disposition.isin(*EXCLUDED_DISPOSITIONS), F.lit("discharged to hospice or died"))
    label = F.when(excluded.isNull(), (s("readmitted") == "<30").cast("int"))
    # a file read for evaluation has no pseudonymous key, and its patient ids are not needed
    patient = F.col("patient_key") if "patient_key" in rows.columns else F.lit(None).cast("string")
    sex = F.lower(F.coalesce(s("gender"), F.lit("unknown")))
    band = F.concat(age_low.cast("int").cast("string"), F.lit("-"), (age_low + 9).cast("int").cast("string"))
    return rows.select(
        patient.alias("patient_key"),
        s("encounter_id").alias("index_id"),
        F.lit(None).cast("timestamp").alias("index_time"),
        F.when(sex.isin("female", "male"), sex).otherwise(F.lit("unknown")).alias("sex"),
        F.coalesce(band, F.lit(UNKNOWN)).alias("age_band"),
        F.lit(UNKNOWN).alias("state"),
        F.coalesce(s("race"), F.lit(UNKNOWN)).alias("race"),
        *[F.coalesce(col.cast("double"), F.lit(0.0)).alias(name) for name, col in features.items()],
        *[(s(c) if c in rows.columns else F.lit(None).cast("string")).alias(c) for c in CODES],
        F.lit(TASK).alias("task"),
        label.alias("label"),
        excluded.alias("excluded"),
    )


def _history(rows: DataFrame, features: dict[str, Column]) -> dict[str, Column]:
    """:data:`HISTORY` as window columns over the patient's encounters before this one (never
    this one or a later one). A patient is ``patient_key`` where the lake pseudonymised it, else
    the file's ``patient_nbr`` (``evaluate --input``), else every row is its own patient."""
    if "patient_key" in rows.columns:
        person = F.col("patient_key")
    elif "patient_nbr" in rows.columns:
        person = F.col("patient_nbr").cast("string")
    else:
        person = F.col("encounter_id").cast("string")
    before = (
        Window.partitionBy(person)
        .orderBy(F.col("encounter_id").cast("long"))
        .rowsBetween(Window.unboundedPreceding, -1)
    )
    readmitted = F.col("readmitted").cast("string")
    earlier = lambda c: F.sum(c.cast("double")).over(before)  # noqa: E731
    ever = lambda c: F.max(c.cast("double")).over(before)  # noqa: E731
    return {
        "earlier_stays": F.count(F.lit(1)).over(before),
        "earlier_readmitted_30d": earlier(readmitted == "<30"),
        "earlier_readmitted": earlier(readmitted.isin("<30", ">30")),
        "previous_readmitted_30d": F.last(readmitted == "<30").over(before),
        "earlier_days_in_hospital": earlier(features["time_in_hospital"]),
        "earlier_emergency_admissions": earlier(features["admission_emergency"]),
        "earlier_heart_failure": ever(features["any_heart_failure"]),
        "earlier_renal": ever(features["any_renal"]),
        "earlier_insulin": ever(features["insulin_given"]),
    }


def read_file(spark, path: str) -> DataFrame:
    """A Diabetes 130-US file (csv or csv.gz) as canonical columns, '?' as null: for evaluation of a
    trained model on a new extract without loading it into the lake."""
    df = spark.read.csv(path, header=True, nullValue="?", inferSchema=False)
    return df.toDF(*[canonical(c) for c in df.columns])
