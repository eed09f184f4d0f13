"""Clean: bronze -> silver, every source onto one common clinical model (``clean/model.py``).

For each entity, each source's mapping (``conf/mappings/<source>.yaml``: a Spark SQL expression per
silver column over its bronze table, optionally after left joins to other bronze tables and a
generator that turns one wide row into several, e.g. three diagnosis columns into three condition
rows) is applied, cast to the declared types, and the sources are unioned. Then, in Spark: code
systems, ICD spellings and encounter classes are normalised (``codes.py``), lab and vital units
converted to UCUM (``units.py``), patients deduplicated by ``patient_key`` and events by their keys,
age at event derived from the exact birth date (opened here, in the job, and never written; from
mid-year where a source gives only the year), and inconsistencies flagged in ``quality_flags``
(kept, not dropped).

Each run rebuilds every silver table as one new Delta version (overwrite), so re-running after a
crash gives the same tables. ``--incremental`` instead recomputes only the patients whose bronze
rows changed since the versions the last run read (``ops.watermarks``) and merges their rows in
(docs/architecture.md, "Incremental clean"); it leaves the tables a rebuild would.

Identifiers never reach silver: it carries ``patient_key`` and ``birth_year``, not names or exact
birth dates.
"""

from ehrlake.clean.mappings import DEFAULT_SOURCES, MAPPINGS_DIR, Join, Mapping, load_mappings, mapping_files
from ehrlake.clean.runner import CleanReport, run

__all__ = [
    "run",
    "CleanReport",
    "load_mappings",
    "mapping_files",
    "Mapping",
    "Join",
    "MAPPINGS_DIR",
    "DEFAULT_SOURCES",
]
