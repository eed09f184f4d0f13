"""``ehrlake view run``: SQL on FHIR v2 ViewDefinitions over files or lake tables."""

from __future__ import annotations

import json

from ehrlake.cli import common
from ehrlake.errors import EhrlakeError


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
    view_cmd = sub.add_parser(
        "view",
        help="SQL on FHIR v2 ViewDefinitions",
        description="Flatten FHIR resources with a ViewDefinition.",
    )
    view_sub = view_cmd.add_subparsers(dest="view_command", required=True, metavar="ACTION")
    view_run = view_sub.add_parser(
        "run",
        help="run a ViewDefinition over FHIR files or a lake table's records",
        description="Run a ViewDefinition (JSON; docs/sql_on_fhir.md) over FHIR NDJSON / Bundle files "
        "(--input) or over the sealed records of a lake table (--table, with --out: a job, audited). "
        "Without --out the first --limit rows are printed.",
    )
    view_run.add_argument(
        "--view", required=True, help="ViewDefinition JSON file (e.g. conf/views/fhir_goal.json)"
    )
    where = view_run.add_mutually_exclusive_group(required=True)
    where.add_argument("--input", help="FHIR files: a file or a directory")
    where.add_argument(
        "--table",
        help="a lake table of FHIR records (their processing copies, raw_deid), e.g. bronze.fhir_other",
    )
    view_run.add_argument("--out", help="write the rows to this lake table (overwritten), e.g. gold.my_view")
    view_run.add_argument("--limit", type=int, default=20, help="rows to print without --out (default 20)")
    view_run.add_argument("--json", action="store_true", help="print rows as JSON lines")
    common.lake_options(view_run)
    common.role_option(view_run)
    view_run.set_defaults(handler=cmd_view_run)


def cmd_view_run(args) -> int:
    from ehrlake import views
    from ehrlake.views import job

    view = views.load(args.view)
    lake, _ = common.open_lake(args)
    if args.table:
        if not args.out:
            raise EhrlakeError("--table opens sealed records: name the output table with --out")
        count = job.run_on_table(lake, view, args.table, args.out, args.role)
        print(f"{args.out}: {count} rows from {args.table} through view {view.name or view.resource}")
        return 0
    frame = views.run(view, job.read_resources(lake.spark, args.input), keep=("source_file",)).drop(
        "source_file"
    )
    if args.out:
        source = f"view {view.name or view.resource} over {args.input}"
        print(f"{args.out}: {job.write_output(lake, args.out, args.role, source, lambda: frame)} rows")
        return 0
    rows = frame.limit(max(args.limit, 0)).collect()  # bounded: --limit rows reach the driver
    if args.json:
        for row in rows:
            print(json.dumps(row.asDict(recursive=True), default=str))
    else:
        print(" | ".join(frame.columns))
        for row in rows:
            print(" | ".join(common.cell(v) for v in row))
    return 0
