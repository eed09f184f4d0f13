"""Clinical notes (issue 23): de-identification of note text (``deid.py``), before notes reach silver
and their concepts reach features."""
