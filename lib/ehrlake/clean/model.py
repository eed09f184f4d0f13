"""The common clinical model (silver): one declaration per entity, the single source of its schema.

Every source maps onto these columns (``conf/mappings/<source>.yaml``); the clean job casts each
mapped column to the type declared here, adds the derived columns (age at event, length of stay,
normalised codes and units, quality flags) and writes ``silver.<entity>``. ``docs/data_model.md`` is
rendered from these declarations and the mappings (``ehrlake.clean.docs``), so it cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import types as T


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # Spark DDL
    meaning: str
    derived: bool = False  # computed by the clean job, not mapped from a source


@dataclass(frozen=True)
class Entity:
    name: str
    description: str
    keys: tuple[str, ...]  # one row per key after deduplication
    fields: tuple[Field, ...]
    event_time: str | None = None  # the column age-at-event and date checks use
    end_time: str | None = None

    @property
    def table(self) -> str:
        return f"silver.{self.name}"

    @property
    def mapped(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.derived)

    def schema(self) -> T.StructType:
        return T.StructType.fromDDL(", ".join(f"`{f.name}` {f.type}" for f in self.fields))


FLAGS = Field(
    "quality_flags",
    "array<string>",
    "inconsistencies found (kept, not dropped): before_birth, after_death, end_before_start, "
    "future_date, implausible_value, unknown_patient, source_nonconformant (the bronze record had "
    "fields not readable as FHIR R4)",
    derived=True,
)
SOURCE = (
    Field("source_system", "string", "hospital / system the record came from"),
    Field("source", "string", "source format: fhir, synthea, mimic-iv, diabetes-130"),
)
PATIENT = Field("patient_key", "string", "pseudonymous patient key (HMAC of source system + patient id)")
ENCOUNTER = Field("encounter_id", "string", "source encounter id (joins silver.encounter)")


def _code(what: str) -> tuple[Field, ...]:
    return (
        Field(
            "code_system",
            "string",
            f"code system of the {what}: SNOMED, LOINC, ICD9CM, ICD10CM, RxNorm, CVX, ...",
        ),
        Field("code", "string", f"{what} code in that system"),
        Field("display", "string", f"human-readable {what} name"),
    )


def _age(column: str) -> Field:
    return Field(
        f"age_at_{column}",
        "int",
        f"age in whole years at {column.replace('_', ' ')} (from the exact birth date; where a source "
        "gives only the year, from 1 July of it, so within a year)",
        derived=True,
    )


ENTITIES: dict[str, Entity] = {
    e.name: e
    for e in (
        Entity(
            "patient",
            "Demographics and region; no direct identifier.",
            ("patient_key",),
            (
                PATIENT,
                *SOURCE,
                Field("gender", "string", "female, male, other or unknown"),
                Field("birth_year", "int", "year of birth (the exact date stays sealed in bronze)"),
                Field("deceased", "boolean", "known to have died"),
                Field("death_date", "date", "date of death where known"),
                Field("race", "string", "race as recorded"),
                Field("ethnicity", "string", "ethnicity as recorded"),
                Field("marital_status", "string", "marital status code as recorded"),
                Field("city", "string", "city of residence"),
                Field("district", "string", "district / county of residence"),
                Field("state", "string", "state of residence (the region used in aggregates)"),
                Field("country", "string", "country of residence"),
                FLAGS,
            ),
        ),
        Entity(
            "encounter",
            "Visits and stays, with class, timing, facility and region.",
            ("source_system", "encounter_id"),
            (
                ENCOUNTER,
                PATIENT,
                *SOURCE,
                Field(
                    "encounter_class",
                    "string",
                    "inpatient, emergency, ambulatory, outpatient, wellness, urgentcare, home, virtual, "
                    "other",
                ),
                *_code("encounter type"),
                Field("start_at", "timestamp", "start of the encounter"),
                Field("end_at", "timestamp", "end of the encounter"),
                Field("organization_id", "string", "facility (joins silver.organization)"),
                Field("discharge_disposition", "string", "where the patient went at discharge, as recorded"),
                Field(
                    "length_of_stay_days",
                    "double",
                    "as recorded where the source gives it without times, else end - start in days",
                ),
                _age("start"),
                Field("state", "string", "state of the facility, else of the patient", derived=True),
                FLAGS,
            ),
            event_time="start_at",
            end_time="end_at",
        ),
        Entity(
            "condition",
            "Diagnoses and problems.",
            ("source_system", "condition_id"),
            (
                Field("condition_id", "string", "source record id"),
                PATIENT,
                ENCOUNTER,
                *SOURCE,
                *_code("condition"),
                Field("onset_at", "timestamp", "onset (or recording) time"),
                Field("abated_at", "timestamp", "resolution time where known"),
                _age("onset"),
                FLAGS,
            ),
            event_time="onset_at",
            end_time="abated_at",
        ),
        Entity(
            "observation",
            "Labs, vitals and survey results, values in UCUM units.",
            ("source_system", "observation_id"),
            (
                Field("observation_id", "string", "source record id"),
                PATIENT,
                ENCOUNTER,
                *SOURCE,
                Field("category", "string", "vital-signs, laboratory, survey, social-history, ..."),
                *_code("observation"),
                Field("value_number", "double", "numeric value, converted to `unit`"),
                Field("unit", "string", "UCUM unit of value_number (normalised for common labs and vitals)"),
                Field("value_code", "string", "coded value (e.g. a SNOMED answer)"),
                Field("source_value", "double", "numeric value as recorded, before conversion"),
                Field("source_unit", "string", "unit as recorded"),
                Field("effective_at", "timestamp", "when it was measured"),
                _age("event"),
                FLAGS,
            ),
            event_time="effective_at",
        ),
        Entity(
            "medication",
            "Medication orders and courses (RxNorm where the source codes them).",
            ("source_system", "medication_id"),
            (
                Field("medication_id", "string", "source record id"),
                PATIENT,
                ENCOUNTER,
                *SOURCE,
                *_code("medication"),
                Field("start_at", "timestamp", "ordered / started"),
                Field("end_at", "timestamp", "stopped, where known"),
                _age("start"),
                FLAGS,
            ),
            event_time="start_at",
            end_time="end_at",
        ),
        Entity(
            "procedure",
            "Procedures performed.",
            ("source_system", "procedure_id"),
            (
                Field("procedure_id", "string", "source record id"),
                PATIENT,
                ENCOUNTER,
                *SOURCE,
                *_code("procedure"),
                Field("start_at", "timestamp", "performed (start)"),
                Field("end_at", "timestamp", "performed (end)"),
                _age("start"),
                FLAGS,
            ),
            event_time="start_at",
            end_time="end_at",
        ),
        Entity(
            "immunization",
            "Vaccinations (CVX).",
            ("source_system", "immunization_id"),
            (
                Field("immunization_id", "string", "source record id"),
                PATIENT,
                ENCOUNTER,
                *SOURCE,
                *_code("vaccine"),
                Field("occurred_at", "timestamp", "when given"),
                _age("event"),
                FLAGS,
            ),
            event_time="occurred_at",
        ),
        Entity(
            "allergy",
            "Allergies and intolerances.",
            ("source_system", "allergy_id"),
            (
                Field("allergy_id", "string", "source record id"),
                PATIENT,
                ENCOUNTER,
                *SOURCE,
                *_code("allergen"),
                Field("category", "string", "food, medication, environment, biologic"),
                Field("criticality", "string", "low, high, unable-to-assess"),
                Field("onset_at", "timestamp", "onset or recording time"),
                _age("onset"),
                FLAGS,
            ),
            event_time="onset_at",
        ),
        Entity(
            "imaging",
            "Images ready for training: pixels resampled to the declared shape (conf/imaging.yaml), "
            "modality, body part, DICOM UIDs and the label where the image set has one.",
            ("source_system", "image_id"),
            (
                Field("image_id", "string", "SOP Instance UID (#frame), PNG path or NPZ file/split/index"),
                PATIENT,
                *SOURCE,
                Field("format", "string", "dicom, png or npz"),
                Field("modality", "string", "DICOM modality: CT, MR, CR, US, ..."),
                Field("body_part", "string", "DICOM body part examined"),
                Field("study_uid", "string", "DICOM Study Instance UID"),
                Field("series_uid", "string", "DICOM Series Instance UID"),
                Field("frame", "int", "frame number within a multi-frame instance (1 for single-frame)"),
                Field("study_date", "date", "DICOM study date"),
                Field("label", "int", "class label where the image set carries one (MedMNIST, PNG folders)"),
                Field("split", "string", "the image set's own split (train / val / test) where it has one"),
                Field("height", "int", "pixel rows (the declared shape)"),
                Field("width", "int", "pixel columns (the declared shape)"),
                Field("pixels", "binary", "height x width little-endian float32 in [0, 1], row-major"),
            ),
        ),
        Entity(
            "organization",
            "Facilities and their region.",
            ("source_system", "organization_id"),
            (
                Field("organization_id", "string", "source organisation id"),
                *SOURCE,
                Field("name", "string", "facility name"),
                Field("city", "string", "city"),
                Field("district", "string", "district / county"),
                Field("state", "string", "state (region)"),
                Field("country", "string", "country"),
            ),
        ),
    )
}
