"""Clinical notes (issue 23, docs/notes.md): de-identification of note text (``deid.py``) and
concepts with their ConText (``concepts.py``), before notes reach silver and features."""
