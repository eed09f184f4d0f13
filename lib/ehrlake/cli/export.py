"""``ehrlake export fhir``: the lake's results as FHIR R4 resources (:mod:`ehrlake.fhir_export`)."""

from __future__ import annotations

from ehrlake.cli import common


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
    export_cmd = sub.add_parser(
        "export", help="results out of the lake in standard formats", description="Export results."
    )
    export_sub = export_cmd.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    fhir = export_sub.add_parser(
        "fhir",
        help="risk scores, image findings and published aggregates as FHIR R4 NDJSON",
        description="Write gold.risk_scores as RiskAssessment, gold.image_findings as Observation and "
        "the suppressed gold.eda_* aggregates as MeasureReport, in the FHIR Bulk Data layout (NDJSON "
        "per type and a manifest.json). Subjects are pseudonymous patient keys; every table read is "
        "audited under --role. --out is replaced when it holds an earlier export, refused when it "
        "holds anything else.",
    )
    fhir.add_argument(
        "--what",
        default="risk,findings,aggregates",
        help="comma-separated: risk, findings, aggregates (default: all three)",
    )
    fhir.add_argument("--task", help="only this task's risk scores and findings")
    fhir.add_argument("--out", required=True, help="output folder")
    fhir.add_argument(
        "--source-ids",
        metavar="SYSTEM",
        help="the export back to a source system: only its patients, each subject its record id there "
        "(a role that may reveal, with --purpose; audited)",
    )
    fhir.add_argument("--purpose", help="why record ids are released (with --source-ids; audited)")
    common.lake_options(fhir)
    common.role_option(fhir)
    fhir.set_defaults(handler=cmd_export_fhir)


def cmd_export_fhir(args) -> int:
    from ehrlake import fhir_export

    lake, _ = common.open_lake(args)
    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    done = fhir_export.run(lake, args.out, what, args.task, args.role, args.source_ids, args.purpose)
    print(done.format())
    return 0
