"""SQL on FHIR v2 ViewDefinitions on Spark: FHIRPath compiled to column expressions over VARIANT.

``views.run(views.load("conf/views/fhir_condition.json"), frame)`` flattens the resources of
``frame["resource"]``; ``docs/sql_on_fhir.md`` lists what the official conformance suite says.
"""

from ehrlake.views.definition import ViewDefinition, ViewError, load, parse
from ehrlake.views.fhirpath import FhirPathError
from ehrlake.views.runner import ISSUES, run

__all__ = ["ISSUES", "FhirPathError", "ViewDefinition", "ViewError", "load", "parse", "run"]
