"""Declarations of the bronze FHIR tables: one :class:`FhirEntity` per modelled resource type.

Each entity says which parts of the resource are parsed (a Spark DDL schema, so the JSON is parsed
once, in the JVM) and how each typed column is derived from them (a SQL expression over the parsed
struct ``r``). Date and dateTime columns are checked: a present but unparseable value sends the
record to quarantine. The full resource is always kept in ``raw``, so nothing is lost by typing.

Resource types that are valid FHIR R4 but not modelled here land in ``bronze.fhir_other``.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- reusable FHIR datatypes as DDL ---------------------------------------------------------------
CODING = "struct<system:string,code:string,display:string>"
CONCEPT = f"struct<coding:array<{CODING}>,text:string>"
REFERENCE = "struct<reference:string,display:string>"
PERIOD = "struct<start:string,end:string>"
QUANTITY = "struct<value:double,unit:string,system:string,code:string>"
IDENTIFIER = f"struct<system:string,value:string,type:{CONCEPT}>"
NAME = "struct<use:string,text:string,family:string,given:array<string>,prefix:array<string>>"
ADDRESS = (
    "struct<line:array<string>,city:string,district:string,state:string,postalCode:string,country:string>"
)
TELECOM = "struct<system:string,value:string,use:string>"
EXTENSION = (
    f"struct<url:string,valueString:string,valueCode:string,valueCoding:{CODING},"
    f"extension:array<struct<url:string,valueString:string,valueCoding:{CODING}>>>"
)
MONEY = "struct<value:double,currency:string>"

IDENTIFIERS_DDL = "array<struct<system:string,value:string,type_code:string>>"


def null_safe_index(expr: str) -> str:
    """Rewrite every ``operand[0]`` as ``get(operand, 0)``, which gives NULL past the end of an array."""
    while "[0]" in expr:
        i = expr.index("[0]")
        j, depth = i - 1, 0
        while j >= 0:
            ch = expr[j]
            if ch in ")]":
                depth += 1
            elif ch in "([":
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and not (ch.isalnum() or ch in "_.`"):
                break
            j -= 1
        expr = f"{expr[: j + 1]}get({expr[j + 1 : i]}, 0){expr[i + 3 :]}"
    return expr


def ref_id(expr: str) -> str:
    """Id part of a reference: ``Patient/123`` and ``urn:uuid:123`` give ``123``; a conditional
    reference (``Practitioner?identifier=...``) is kept whole, to be resolved in the clean stage."""
    return f"CASE WHEN {expr} LIKE '%?%' THEN {expr} ELSE regexp_extract({expr}, '([^/:]+)$', 1) END"


def first_coding(concept: str, part: str) -> str:
    return f"{concept}.coding[0].{part}"


def identifiers(expr: str) -> str:
    fields = "'system', i.system, 'value', i.value, 'type_code', i.type.coding[0].code"
    return f"transform({expr}, i -> named_struct({fields}))"


def extension_coding(url_suffix: str) -> str:
    """display of the ``ombCategory`` coding inside a US Core race/ethnicity extension."""
    ext = f"filter(r.extension, e -> e.url LIKE '%{url_suffix}')[0]"
    return f"filter({ext}.extension, x -> x.url = 'ombCategory')[0].valueCoding.display"


@dataclass(frozen=True)
class Column:
    """A typed bronze column: name, Spark type, SQL over the parsed resource ``r``, and its FHIR path."""

    name: str
    type: str  # string | date | timestamp | double | boolean | long | identifiers
    expr: str
    fhir_path: str = ""

    @property
    def is_temporal(self) -> bool:
        return self.type in ("date", "timestamp")

    @property
    def sql(self) -> str:
        """The expression with ``x[0]`` made null-tolerant (ANSI mode fails on an empty array)."""
        return null_safe_index(self.expr)

    @property
    def ddl(self) -> str:
        """The column's Spark type as DDL (the table schema is derived from these)."""
        return {"identifiers": IDENTIFIERS_DDL, "strings": "array<string>"}.get(self.type, self.type)


def _date(name: str, path: str, kind: str = "timestamp") -> Column:
    return Column(name, kind, path, path.replace("r.", ""))


@dataclass(frozen=True)
class FhirEntity:
    resource_type: str
    table: str
    parse_schema: str
    columns: tuple[Column, ...]
    description: str

    @property
    def patient_column(self) -> str | None:
        return "patient_id" if any(c.name == "patient_id" for c in self.columns) else None


def _subject(field: str = "subject") -> Column:
    return Column("patient_id", "string", ref_id(f"r.{field}.reference"), f"{field}.reference")


def _encounter() -> Column:
    return Column("encounter_id", "string", ref_id("r.encounter.reference"), "encounter.reference")


def _address() -> tuple[Column, ...]:
    """The first address, in clear columns (place names analysts group by)."""
    parts = (
        ("city", "city"),
        ("district", "district"),
        ("state", "state"),
        ("postal_code", "postalCode"),
        ("country", "country"),
    )
    return tuple(Column(name, "string", f"r.address[0].{fhir}", f"address[0].{fhir}") for name, fhir in parts)


def _telecom(system: str) -> Column:
    """The first contact point of one kind (phone, email)."""
    return Column(
        system,
        "string",
        f"filter(r.telecom, t -> t.system = '{system}')[0].value",
        f"telecom[system={system}]",
    )


def _coded(name: str, field: str) -> Column:
    """The code of a CodeableConcept's first coding (statuses, categories, dispositions)."""
    return Column(name, "string", first_coding(f"r.{field}", "code"), field)


def _code(prefix: str, concept: str, path: str) -> tuple[Column, ...]:
    return (
        Column(f"{prefix}_system", "string", first_coding(concept, "system"), f"{path}.coding[0].system"),
        Column(f"{prefix}", "string", first_coding(concept, "code"), f"{path}.coding[0].code"),
        Column(
            f"{prefix}_display",
            "string",
            f"coalesce({first_coding(concept, 'display')}, {concept}.text)",
            f"{path}.coding[0].display | {path}.text",
        ),
    )


ENTITIES: tuple[FhirEntity, ...] = (
    FhirEntity(
        "Patient",
        "bronze.fhir_patient",
        f"struct<gender:string,birthDate:string,deceasedBoolean:boolean,deceasedDateTime:string,"
        f"name:array<{NAME}>,address:array<{ADDRESS}>,telecom:array<{TELECOM}>,identifier:array<{IDENTIFIER}>,"
        f"maritalStatus:{CONCEPT},extension:array<{EXTENSION}>,managingOrganization:{REFERENCE},"
        f"generalPractitioner:array<{REFERENCE}>>",
        (
            Column("gender", "string", "r.gender", "gender"),
            _date("birth_date", "r.birthDate", "date"),
            Column(
                "deceased",
                "boolean",
                "coalesce(r.deceasedBoolean, r.deceasedDateTime IS NOT NULL)",
                "deceasedBoolean | deceasedDateTime",
            ),
            _date("deceased_at", "r.deceasedDateTime"),
            Column("family_name", "string", "r.name[0].family", "name[0].family"),
            Column("given_names", "strings", "r.name[0].given", "name[0].given"),
            Column("name_prefix", "strings", "r.name[0].prefix", "name[0].prefix"),
            Column("address_line", "strings", "r.address[0].line", "address[0].line"),
            *_address(),
            _telecom("phone"),
            _telecom("email"),
            Column("identifiers", "identifiers", identifiers("r.identifier"), "identifier[]"),
            _coded("marital_status", "maritalStatus"),
            Column("race", "string", extension_coding("us-core-race"), "extension[us-core-race]"),
            Column(
                "ethnicity", "string", extension_coding("us-core-ethnicity"), "extension[us-core-ethnicity]"
            ),
            Column(
                "managing_organization_id",
                "string",
                ref_id("r.managingOrganization.reference"),
                "managingOrganization",
            ),
            Column(
                "general_practitioner_id",
                "string",
                ref_id("r.generalPractitioner[0].reference"),
                "generalPractitioner[0]",
            ),
        ),
        "Demographics and direct identifiers of a person receiving care.",
    ),
    FhirEntity(
        "Encounter",
        "bronze.fhir_encounter",
        f"struct<status:string,class:{CODING},type:array<{CONCEPT}>,subject:{REFERENCE},period:{PERIOD},"
        f"serviceProvider:{REFERENCE},participant:array<struct<individual:{REFERENCE}>>,"
        f"location:array<struct<location:{REFERENCE}>>,reasonCode:array<{CONCEPT}>,"
        f"hospitalization:struct<admitSource:{CONCEPT},dischargeDisposition:{CONCEPT}>>",
        (
            _subject(),
            Column("status", "string", "r.status", "status"),
            Column("class_code", "string", "r.class.code", "class.code"),
            *_code("type_code", "r.type[0]", "type[0]"),
            _date("period_start", "r.period.start"),
            _date("period_end", "r.period.end"),
            Column("service_provider_id", "string", ref_id("r.serviceProvider.reference"), "serviceProvider"),
            Column(
                "practitioner_id",
                "string",
                ref_id("r.participant[0].individual.reference"),
                "participant[0].individual",
            ),
            Column(
                "location_id", "string", ref_id("r.location[0].location.reference"), "location[0].location"
            ),
            *_code("reason_code", "r.reasonCode[0]", "reasonCode[0]"),
            _coded("admit_source", "hospitalization.admitSource"),
            _coded("discharge_disposition", "hospitalization.dischargeDisposition"),
        ),
        "A contact between a patient and a provider (visit, admission, emergency, ...).",
    ),
    FhirEntity(
        "Condition",
        "bronze.fhir_condition",
        f"struct<subject:{REFERENCE},encounter:{REFERENCE},clinicalStatus:{CONCEPT},verificationStatus:{CONCEPT},"
        f"category:array<{CONCEPT}>,code:{CONCEPT},onsetDateTime:string,abatementDateTime:string,recordedDate:string>",
        (
            _subject(),
            _encounter(),
            _coded("clinical_status", "clinicalStatus"),
            _coded("verification_status", "verificationStatus"),
            _coded("category", "category[0]"),
            *_code("code", "r.code", "code"),
            _date("onset_at", "r.onsetDateTime"),
            _date("abatement_at", "r.abatementDateTime"),
            _date("recorded_at", "r.recordedDate"),
        ),
        "A diagnosis, problem or health concern.",
    ),
    FhirEntity(
        "Observation",
        "bronze.fhir_observation",
        f"struct<status:string,category:array<{CONCEPT}>,code:{CONCEPT},subject:{REFERENCE},encounter:{REFERENCE},"
        f"effectiveDateTime:string,effectivePeriod:{PERIOD},issued:string,valueQuantity:{QUANTITY},"
        f"valueCodeableConcept:{CONCEPT},valueString:string,valueBoolean:boolean,"
        f"component:array<struct<code:{CONCEPT},valueQuantity:{QUANTITY},valueCodeableConcept:{CONCEPT}>>>",
        (
            _subject(),
            _encounter(),
            Column("status", "string", "r.status", "status"),
            _coded("category", "category[0]"),
            *_code("code", "r.code", "code"),
            _date("effective_at", "coalesce(r.effectiveDateTime, r.effectivePeriod.start)"),
            _date("issued_at", "r.issued"),
            Column("value_quantity", "double", "r.valueQuantity.value", "valueQuantity.value"),
            Column(
                "value_unit",
                "string",
                "coalesce(r.valueQuantity.code, r.valueQuantity.unit)",
                "valueQuantity.code | valueQuantity.unit",
            ),
            *_code("value_code", "r.valueCodeableConcept", "valueCodeableConcept"),
            Column("value_string", "string", "r.valueString", "valueString"),
            Column("value_boolean", "boolean", "r.valueBoolean", "valueBoolean"),
            Column(
                "components",
                "array<struct<code_system:string,code:string,display:string,value_quantity:double,value_unit:string>>",
                "transform(r.component, c -> named_struct('code_system', c.code.coding[0].system, "
                "'code', c.code.coding[0].code, 'display', c.code.coding[0].display, "
                "'value_quantity', c.valueQuantity.value, "
                "'value_unit', coalesce(c.valueQuantity.code, c.valueQuantity.unit)))",
                "component[]",
            ),
        ),
        "A measurement: lab result, vital sign, survey answer, social history item.",
    ),
    FhirEntity(
        "MedicationRequest",
        "bronze.fhir_medication_request",
        f"struct<status:string,intent:string,subject:{REFERENCE},encounter:{REFERENCE},"
        f"medicationCodeableConcept:{CONCEPT},medicationReference:{REFERENCE},authoredOn:string,"
        f"requester:{REFERENCE},reasonCode:array<{CONCEPT}>,dosageInstruction:array<struct<text:string>>>",
        (
            _subject(),
            _encounter(),
            Column("status", "string", "r.status", "status"),
            Column("intent", "string", "r.intent", "intent"),
            *_code("medication_code", "r.medicationCodeableConcept", "medicationCodeableConcept"),
            Column(
                "medication_ref", "string", ref_id("r.medicationReference.reference"), "medicationReference"
            ),
            _date("authored_at", "r.authoredOn"),
            Column("requester_id", "string", ref_id("r.requester.reference"), "requester"),
            *_code("reason_code", "r.reasonCode[0]", "reasonCode[0]"),
            Column("dosage_text", "string", "r.dosageInstruction[0].text", "dosageInstruction[0].text"),
        ),
        "An order for a medication.",
    ),
    FhirEntity(
        "Procedure",
        "bronze.fhir_procedure",
        f"struct<status:string,subject:{REFERENCE},encounter:{REFERENCE},code:{CONCEPT},performedDateTime:string,"
        f"performedPeriod:{PERIOD},reasonCode:array<{CONCEPT}>>",
        (
            _subject(),
            _encounter(),
            Column("status", "string", "r.status", "status"),
            *_code("code", "r.code", "code"),
            _date("performed_start", "coalesce(r.performedDateTime, r.performedPeriod.start)"),
            _date("performed_end", "coalesce(r.performedPeriod.end, r.performedDateTime)"),
            *_code("reason_code", "r.reasonCode[0]", "reasonCode[0]"),
        ),
        "An action performed on or for a patient (surgery, counselling, ...).",
    ),
    FhirEntity(
        "Immunization",
        "bronze.fhir_immunization",
        f"struct<status:string,patient:{REFERENCE},encounter:{REFERENCE},vaccineCode:{CONCEPT},"
        f"occurrenceDateTime:string,primarySource:boolean>",
        (
            _subject("patient"),
            _encounter(),
            Column("status", "string", "r.status", "status"),
            *_code("vaccine_code", "r.vaccineCode", "vaccineCode"),
            _date("occurred_at", "r.occurrenceDateTime"),
            Column("primary_source", "boolean", "r.primarySource", "primarySource"),
        ),
        "A vaccine given (or reported).",
    ),
    FhirEntity(
        "AllergyIntolerance",
        "bronze.fhir_allergy",
        f"struct<patient:{REFERENCE},encounter:{REFERENCE},clinicalStatus:{CONCEPT},verificationStatus:{CONCEPT},"
        f"type:string,category:array<string>,criticality:string,code:{CONCEPT},onsetDateTime:string,recordedDate:string>",
        (
            _subject("patient"),
            _encounter(),
            _coded("clinical_status", "clinicalStatus"),
            _coded("verification_status", "verificationStatus"),
            Column("allergy_type", "string", "r.type", "type"),
            Column("category", "string", "r.category[0]", "category[0]"),
            Column("criticality", "string", "r.criticality", "criticality"),
            *_code("code", "r.code", "code"),
            _date("onset_at", "r.onsetDateTime"),
            _date("recorded_at", "r.recordedDate"),
        ),
        "An allergy or intolerance.",
    ),
    FhirEntity(
        "Organization",
        "bronze.fhir_organization",
        f"struct<active:boolean,name:string,type:array<{CONCEPT}>,identifier:array<{IDENTIFIER}>,"
        f"address:array<{ADDRESS}>,telecom:array<{TELECOM}>,partOf:{REFERENCE}>",
        (
            Column("name", "string", "r.name", "name"),
            Column("active", "boolean", "r.active", "active"),
            *_code("type_code", "r.type[0]", "type[0]"),
            Column("identifiers", "identifiers", identifiers("r.identifier"), "identifier[]"),
            *_address(),
            _telecom("phone"),
            Column("part_of_id", "string", ref_id("r.partOf.reference"), "partOf"),
        ),
        "A hospital, clinic, payer or other organisation.",
    ),
    FhirEntity(
        "Practitioner",
        "bronze.fhir_practitioner",
        f"struct<active:boolean,gender:string,name:array<{NAME}>,identifier:array<{IDENTIFIER}>,"
        f"address:array<{ADDRESS}>,telecom:array<{TELECOM}>>",
        (
            Column("gender", "string", "r.gender", "gender"),
            Column("family_name", "string", "r.name[0].family", "name[0].family"),
            Column("given_names", "strings", "r.name[0].given", "name[0].given"),
            Column("identifiers", "identifiers", identifiers("r.identifier"), "identifier[]"),
            *_address(),
            _telecom("email"),
        ),
        "A clinician or other health professional.",
    ),
    FhirEntity(
        "Claim",
        "bronze.fhir_claim",
        f"struct<status:string,use:string,type:{CONCEPT},patient:{REFERENCE},billablePeriod:{PERIOD},created:string,"
        f"provider:{REFERENCE},total:{MONEY},item:array<struct<encounter:array<{REFERENCE}>>>>",
        (
            _subject("patient"),
            Column("status", "string", "r.status", "status"),
            Column("claim_use", "string", "r.use", "use"),
            _coded("type_code", "type"),
            _date("billable_start", "r.billablePeriod.start"),
            _date("billable_end", "r.billablePeriod.end"),
            _date("created_at", "r.created"),
            Column("provider_id", "string", ref_id("r.provider.reference"), "provider"),
            Column(
                "encounter_id", "string", ref_id("r.item[0].encounter[0].reference"), "item[0].encounter[0]"
            ),
            Column("total_value", "double", "r.total.value", "total.value"),
            Column("total_currency", "string", "r.total.currency", "total.currency"),
        ),
        "A request for payment for services.",
    ),
    FhirEntity(
        "ExplanationOfBenefit",
        "bronze.fhir_explanation_of_benefit",
        f"struct<status:string,use:string,type:{CONCEPT},patient:{REFERENCE},billablePeriod:{PERIOD},created:string,"
        f"provider:{REFERENCE},claim:{REFERENCE},total:array<struct<category:{CONCEPT},amount:{MONEY}>>,"
        f"payment:struct<amount:{MONEY}>>",
        (
            _subject("patient"),
            Column("status", "string", "r.status", "status"),
            _coded("type_code", "type"),
            _date("billable_start", "r.billablePeriod.start"),
            _date("billable_end", "r.billablePeriod.end"),
            _date("created_at", "r.created"),
            Column("provider_id", "string", ref_id("r.provider.reference"), "provider"),
            Column("claim_id", "string", ref_id("r.claim.reference"), "claim"),
            Column("total_value", "double", "r.total[0].amount.value", "total[0].amount.value"),
            Column("payment_value", "double", "r.payment.amount.value", "payment.amount.value"),
        ),
        "The adjudicated outcome of a claim.",
    ),
)

OTHER_TABLE = "bronze.fhir_other"
BY_TYPE = {e.resource_type: e for e in ENTITIES}

# Every resource type of FHIR R4 (4.0.1). A resourceType outside this list is quarantined.
R4_RESOURCE_TYPES = frozenset(
    [
        "Account",
        "ActivityDefinition",
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "AppointmentResponse",
        "AuditEvent",
        "Basic",
        "Binary",
        "BiologicallyDerivedProduct",
        "BodyStructure",
        "Bundle",
        "CapabilityStatement",
        "CarePlan",
        "CareTeam",
        "CatalogEntry",
        "ChargeItem",
        "ChargeItemDefinition",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "CodeSystem",
        "Communication",
        "CommunicationRequest",
        "CompartmentDefinition",
        "Composition",
        "ConceptMap",
        "Condition",
        "Consent",
        "Contract",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "Device",
        "DeviceDefinition",
        "DeviceMetric",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "EffectEvidenceSynthesis",
        "Encounter",
        "Endpoint",
        "EnrollmentRequest",
        "EnrollmentResponse",
        "EpisodeOfCare",
        "EventDefinition",
        "Evidence",
        "EvidenceVariable",
        "ExampleScenario",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "GraphDefinition",
        "Group",
        "GuidanceResponse",
        "HealthcareService",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "ImplementationGuide",
        "InsurancePlan",
        "Invoice",
        "Library",
        "Linkage",
        "List",
        "Location",
        "Measure",
        "MeasureReport",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationKnowledge",
        "MedicationRequest",
        "MedicationStatement",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "MessageDefinition",
        "MessageHeader",
        "MolecularSequence",
        "NamingSystem",
        "NutritionOrder",
        "Observation",
        "ObservationDefinition",
        "OperationDefinition",
        "OperationOutcome",
        "Organization",
        "OrganizationAffiliation",
        "Parameters",
        "Patient",
        "PaymentNotice",
        "PaymentReconciliation",
        "Person",
        "PlanDefinition",
        "Practitioner",
        "PractitionerRole",
        "Procedure",
        "Provenance",
        "Questionnaire",
        "QuestionnaireResponse",
        "RelatedPerson",
        "RequestGroup",
        "ResearchDefinition",
        "ResearchElementDefinition",
        "ResearchStudy",
        "ResearchSubject",
        "RiskAssessment",
        "RiskEvidenceSynthesis",
        "Schedule",
        "SearchParameter",
        "ServiceRequest",
        "Slot",
        "Specimen",
        "SpecimenDefinition",
        "StructureDefinition",
        "StructureMap",
        "Subscription",
        "Substance",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
        "SupplyDelivery",
        "SupplyRequest",
        "Task",
        "TerminologyCapabilities",
        "TestReport",
        "TestScript",
        "ValueSet",
        "VerificationResult",
        "VisionPrescription",
    ]
)
