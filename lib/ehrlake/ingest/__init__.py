"""Ingest EHR dumps into bronze Delta tables; every bad record lands in ``ops.quarantine``.

``run(lake, SourceKind.FHIR_NDJSON, "dump/")`` reads only files not ingested before, types and
validates every record, merges the newest version of each record into its bronze table, and
returns an :class:`IngestReport` whose counts add up. The run loop is :mod:`.runner`; what each
source kind reads and writes is its adapter in :mod:`.adapters`.
"""

from ehrlake.ingest.report import EntityCounts, IngestReport
from ehrlake.ingest.runner import RUNS_TABLE, run
from ehrlake.ingest.sources import SourceKind

__all__ = ["run", "SourceKind", "IngestReport", "EntityCounts", "RUNS_TABLE"]
