"""Population generator: amplify the bundled sample patients into N distinct ones (``amplify.py``),
as Synthea CSV or FHIR (``fhir.py``), for volume and throughput tests, never as a test split."""

from ehrlake.synth.amplify import DEFAULT_REGIONS, FORMATS, PATIENT_TABLES, SynthReport, run

__all__ = ["DEFAULT_REGIONS", "FORMATS", "PATIENT_TABLES", "SynthReport", "run"]
