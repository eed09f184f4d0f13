"""Clinical notes (issue 23, docs/notes.md): note text out of FHIR resources (``documents.py``), its
de-identification (``deid.py``) and concepts with their ConText (``concepts.py``), before notes
reach silver and features."""
