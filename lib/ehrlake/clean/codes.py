"""Code systems under one set of names, whatever the source called them.

FHIR names systems by URI (``http://snomed.info/sct``), Synthea by short names or not at all, MIMIC
by an ICD version number. Silver uses one short name per system so analysts can filter by it.
"""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

# lower-cased spelling as found in sources -> silver name
SYSTEMS: dict[str, str] = {
    "http://snomed.info/sct": "SNOMED",
    "snomed": "SNOMED",
    "snomed-ct": "SNOMED",
    "snomed ct": "SNOMED",
    "sct": "SNOMED",
    "http://loinc.org": "LOINC",
    "loinc": "LOINC",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "icd10cm": "ICD10CM",
    "icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "icd10": "ICD10",
    "icd-10": "ICD10",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "icd9cm": "ICD9CM",
    "icd-9-cm": "ICD9CM",
    "icd9": "ICD9CM",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "rxnorm": "RxNorm",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "cvx": "CVX",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "ndc": "NDC",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "cpt": "CPT",
    "http://unitsofmeasure.org": "UCUM",
}


def lookup(table: dict, key: Column) -> Column:
    """``table[key]`` as a Spark map lookup (null where the key is not in the table)."""
    return F.create_map(*[F.lit(x) for pair in table.items() for x in pair])[key]


def normalise_code(system: Column, code: Column) -> Column:
    """ICD codes in their dotted form whatever the source wrote (MIMIC ``4139``, Diabetes 130-US
    ``250.83``, FHIR ``E11.9``): upper case, a dot after the category (3 characters; 4 for ICD-9-CM
    E codes), so one condition has one spelling across sources. Other systems are kept as given."""
    bare = F.upper(F.regexp_replace(F.trim(code), r"\.", ""))
    category = F.when(system.isin("ICD9CM") & bare.startswith("E"), 4).otherwise(3)
    dotted = F.when(
        F.length(bare) > category,
        F.concat(bare.substr(F.lit(1), category), F.lit("."), bare.substr(category + 1, F.lit(100))),
    ).otherwise(bare)
    return F.when(system.isin("ICD9CM", "ICD10CM", "ICD10"), dotted).otherwise(F.trim(code))


def normalise_system(system: Column) -> Column:
    """The silver name of a code system; an unknown system is kept as given (never lost)."""
    known = lookup(SYSTEMS, F.lower(F.trim(system)))
    return F.when(system.isNull(), F.lit(None)).otherwise(F.coalesce(known, F.trim(system)))


ENCOUNTER_CLASSES: dict[str, str] = {
    # FHIR v3 ActCode and Synthea's classes
    "imp": "inpatient",
    "inpatient": "inpatient",
    "acute": "inpatient",
    "nonac": "inpatient",
    "emer": "emergency",
    "emergency": "emergency",
    "amb": "ambulatory",
    "ambulatory": "ambulatory",
    "outpatient": "outpatient",
    "wellness": "wellness",
    "urgentcare": "urgentcare",
    "hh": "home",
    "home": "home",
    "vr": "virtual",
    "virtual": "virtual",
    "obsenc": "outpatient",
    "prenc": "ambulatory",
}


def normalise_encounter_class(value: Column) -> Column:
    mapping = F.create_map(*[F.lit(x) for pair in ENCOUNTER_CLASSES.items() for x in pair])
    return F.when(value.isNull(), F.lit(None)).otherwise(
        F.coalesce(mapping[F.lower(F.trim(value))], F.lit("other"))
    )


def normalise_gender(value: Column) -> Column:
    v = F.lower(F.trim(value))
    return (
        F.when(v.isin("female", "f"), "female")
        .when(v.isin("male", "m"), "male")
        .when(v.isin("other", "o"), "other")
        .otherwise("unknown")
    )


US_STATES = {
    "AL": "Alabama", "AK": "Alaska", "AZ": "Arizona", "AR": "Arkansas", "CA": "California", "CO": "Colorado",
    "CT": "Connecticut", "DE": "Delaware", "DC": "District of Columbia", "FL": "Florida", "GA": "Georgia",
    "HI": "Hawaii", "ID": "Idaho", "IL": "Illinois", "IN": "Indiana", "IA": "Iowa", "KS": "Kansas",
    "KY": "Kentucky", "LA": "Louisiana", "ME": "Maine", "MD": "Maryland", "MA": "Massachusetts",
    "MI": "Michigan", "MN": "Minnesota", "MS": "Mississippi", "MO": "Missouri", "MT": "Montana",
    "NE": "Nebraska", "NV": "Nevada", "NH": "New Hampshire", "NJ": "New Jersey", "NM": "New Mexico",
    "NY": "New York", "NC": "North Carolina", "ND": "North Dakota", "OH": "Ohio", "OK": "Oklahoma",
    "OR": "Oregon", "PA": "Pennsylvania", "RI": "Rhode Island", "SC": "South Carolina", "SD": "South Dakota",
    "TN": "Tennessee", "TX": "Texas", "UT": "Utah", "VT": "Vermont", "VA": "Virginia", "WA": "Washington",
    "WV": "West Virginia", "WI": "Wisconsin", "WY": "Wyoming",
}  # fmt: skip


def normalise_state(state: Column, country: Column) -> Column:
    """One spelling per region: in US records (country US), postal codes become state names, as
    Indian sources and NFHS-5 name states; everything else is kept as recorded, trimmed."""
    name = lookup(US_STATES, F.upper(F.trim(state)))
    is_us = F.coalesce(F.upper(country).isin("US", "USA", "UNITED STATES"), F.lit(False))
    return F.when(state.isNull(), F.lit(None)).otherwise(
        F.when(is_us & name.isNotNull(), name).otherwise(F.trim(state))
    )
