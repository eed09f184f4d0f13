"""Commands that read the lake as a role may: read, sql, serve sql, reveal, audit verify, lake show."""

from __future__ import annotations

import csv
import json
import os
import sys

from ehrlake.cli import common
from ehrlake.errors import EhrlakeError


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
    read = sub.add_parser(
        "read",
        help="print rows of a table as a role may see them",
        description="Read a table through the access policy: tables the role may not read are refused, "
        "hidden columns are dropped, sealed identifiers are never opened; the read is audited.",
    )
    read.add_argument("--table", required=True, help="logical table name, e.g. silver.condition")
    read.add_argument("--limit", type=int, default=20, help="at most this many rows (default 20)")
    read.add_argument("--json", action="store_true", help="one JSON object per row")
    common.lake_options(read)
    common.role_option(read)
    read.set_defaults(handler=cmd_read)

    sql = sub.add_parser(
        "sql",
        help="run a SQL query over the lake's tables as a role may see them",
        description="Run one query (SELECT / WITH) naming tables as layer.table. Tables the role may not "
        "read are refused before anything runs, hidden columns are absent, and the statement is audited. "
        "Needs Delta Lake's JARs (make setup).",
    )
    sql.add_argument("statement", help='e.g. "SELECT code, count(*) FROM silver.condition GROUP BY code"')
    sql.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    output = sql.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per row")
    output.add_argument("--csv", action="store_true", help="CSV with a header row")
    common.lake_options(sql)
    common.role_option(sql)
    sql.set_defaults(handler=cmd_sql)

    serve = sub.add_parser("serve", help="serve the lake to clients", description="Serve the lake.")
    serve_sub = serve.add_subparsers(dest="serve_command", required=True, metavar="SUBCOMMAND")
    server = serve_sub.add_parser(
        "sql",
        help="Spark Connect and JDBC servers of one role's views on 127.0.0.1 (notebooks, BI tools)",
        description="Serve the tables a role may read, as the policy shows them, to Spark Connect clients "
        "(SparkSession.builder.remote) and JDBC clients (Hive driver) on 127.0.0.1 with a bearer token. "
        "Reads by path, commands, UDFs and reflection are refused; every statement is audited. Needs Delta "
        "Lake's JARs (make setup).",
    )
    server.add_argument("--port", type=int, default=15002, help="Spark Connect's port (default 15002)")
    server.add_argument(
        "--jdbc-port",
        type=int,
        default=10000,
        help="the JDBC (Thrift) server's port, 0 for none (default 10000)",
    )
    server.add_argument(
        "--token-file",
        help="where the clients' bearer token is written, mode 0600 (default: beside the key store, "
        "sql-server-PORT.token)",
    )
    server.add_argument("--for", dest="seconds", type=float, help="stop after this many seconds")
    common.lake_options(server)
    common.role_option(server)
    server.set_defaults(handler=cmd_serve_sql)

    reveal = sub.add_parser(
        "reveal",
        help="open one patient's identifiers (roles allowed to reveal only; audited)",
        description="Show one patient's rows of a table with sealed identifiers opened. Only roles "
        "with reveal: true may; every reveal, allowed or denied, is written to the audit log.",
    )
    reveal.add_argument("--table", required=True, help="logical table name, e.g. bronze.fhir_patient")
    reveal.add_argument("--patient-key", required=True, help="the pseudonymous patient_key")
    reveal.add_argument("--purpose", required=True, help="why (recorded in the audit log)")
    common.lake_options(reveal)
    common.role_option(reveal)
    reveal.set_defaults(handler=cmd_reveal)

    audit = sub.add_parser("audit", help="the tamper-evident audit log", description="The audit log.")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    verify = audit_sub.add_parser(
        "verify",
        help="check the hash chain, signed checkpoints and witness; exit 1 at the first broken link",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    common.lake_options(verify)
    verify.set_defaults(handler=cmd_audit_verify)

    lake_cmd = sub.add_parser("lake", help="inspect the lake", description="Inspect the tables of the lake.")
    lake_sub = lake_cmd.add_subparsers(dest="lake_command", required=True, metavar="SUBCOMMAND")
    show = lake_sub.add_parser(
        "show",
        help="every table with layer, Delta version, rows and last operation",
        description="List every Delta table under the lake root.",
    )
    show.add_argument("--json", action="store_true", help="machine-readable output for scripts")
    common.lake_options(show)
    show.set_defaults(handler=cmd_lake_show)
    maintain = lake_sub.add_parser(
        "maintain",
        help="compact small files, set retention, vacuum what no version needs (audit log untouched)",
        description="Per table: Delta retention properties, compaction (OPTIMIZE) and VACUUM.",
    )
    maintain.add_argument("--table", action="append", help="only this table (repeatable; default: all)")
    maintain.add_argument(
        "--retain-days", type=int, default=7, help="days removed files stay for time travel (default 7)"
    )
    maintain.add_argument(
        "--zorder", action="append", help="rewrite Z-ordered on this column where a table has it (repeatable)"
    )
    maintain.add_argument(
        "--dry-run", action="store_true", help="count what would be vacuumed; change nothing"
    )
    maintain.add_argument("--json", action="store_true", help="every table's figures, for scripts")
    common.role_option(maintain)
    common.lake_options(maintain)
    maintain.set_defaults(handler=cmd_lake_maintain)


def cmd_read(args) -> int:
    lake, _ = common.open_lake(args)
    df = lake.read(args.table, role=args.role or lake.security.default_role)
    rows = df.limit(max(args.limit, 0)).collect()  # bounded: --limit rows reach the driver
    if args.json:
        for row in rows:
            print(json.dumps(row.asDict(recursive=True), default=str))
    else:
        print(f"{args.table}: {', '.join(df.columns)}")
        for row in rows:
            print(" | ".join(common.cell(v) for v in row))
    return 0


def cmd_sql(args) -> int:
    from ehrlake import sql

    lake, _ = common.open_lake(args)
    df = sql.query(lake, args.statement, args.role or lake.security.default_role)
    rows = df.limit(max(args.limit, 0)).collect()  # bounded: --limit rows reach the driver
    if args.json:
        for row in rows:
            print(json.dumps(row.asDict(recursive=True), default=str))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(df.columns)
        writer.writerows([list(row) for row in rows])
    else:
        print(" | ".join(df.columns))
        for row in rows:
            print(" | ".join(common.cell(v) for v in row))
    return 0


def cmd_serve_sql(args) -> int:
    from ehrlake.sql import SqlServer

    lake, _ = common.open_lake(args)
    role = args.role or lake.security.default_role
    server = SqlServer(lake, role, args.port, args.jdbc_port or None, args.token_file)
    server.start()
    jdbc = f" and {server.jdbc_url} (password: the token)" if server.jdbc_url else ""
    print(
        f"serving role {server.role.name}'s views of {len(server.views.views)} table(s) of {lake.root} at "
        f"{server.url}{jdbc}; token in {server.token_file}; a client: "
        f'SparkSession.builder.remote("{server.url}/;token=TOKEN"); Ctrl-C stops',
        flush=True,
    )
    server.serve(args.seconds)
    print("stopped; statements are in audit.events (action sql)", flush=True)
    return 0


def cmd_reveal(args) -> int:
    lake, _ = common.open_lake(args)
    role = args.role or lake.security.default_role
    rows = lake.reveal(args.table, args.patient_key, role, args.purpose).collect()
    for row in rows:
        print(json.dumps(row.asDict(recursive=True), default=str))
    print(
        f"{len(rows)} row(s) of {args.table} revealed to role {role}; recorded in audit.events",
        file=sys.stderr,
    )
    return 0


def cmd_audit_verify(args) -> int:
    lake, _ = common.open_lake(args)
    report = lake.security.audit.verify(lake)
    if args.json:
        print(json.dumps({"ok": report.ok, **report.__dict__}, indent=2))
    else:
        print(report.format())
    return 0 if report.ok else common.EXIT_FAILURE


def cmd_lake_show(args) -> int:
    if args.lake and not os.path.isdir(args.lake):
        raise EhrlakeError(f"lake root {args.lake} does not exist")
    lake, _ = common.open_lake(args)
    tables = lake.tables()
    if args.json:
        listed = {"lake": lake.root, "engine": lake.engine.name, "tables": [t.as_dict() for t in tables]}
        print(json.dumps(listed, indent=2))
        return 0
    print(format_tables(f"{lake.root} (engine {lake.engine.name})", tables))
    return 0


def cmd_lake_maintain(args) -> int:
    from dataclasses import asdict

    from ehrlake.lake.maintenance import maintain

    lake, _ = common.open_lake(args)
    done = maintain(
        lake, args.table, args.retain_days, zorder=args.zorder, role=args.role, dry_run=args.dry_run
    )
    if args.json:
        print(json.dumps({"lake": lake.root, "dry_run": args.dry_run, "tables": [asdict(t) for t in done]}))
        return 0
    before, after = sum(t.files_before for t in done), sum(t.files_after for t in done)
    vacuumed = sum(t.vacuumed for t in done)
    dry = " (dry run: nothing changed)" if args.dry_run else ""
    print(f"{len(done)} tables: {before} files -> {after}, {vacuumed} vacuumed{dry}")
    busiest = sorted(done, key=lambda t: t.files_before - t.files_after + t.vacuumed, reverse=True)
    for table in [t for t in busiest if t.compacted or t.vacuumed][:5]:  # --json lists every table
        print("  " + table.line())
    return 0


def format_tables(root: str, tables) -> str:
    if not tables:
        return f"lake {root}: no tables yet"
    width = max(len(t.name) for t in tables)
    lines = [
        f"lake {root}",
        f"{'table':<{width}}  {'layer':<6} {'version':>7} {'rows':>10}  {'last operation':<15} last commit",
    ]
    for t in tables:
        lines.append(
            f"{t.name:<{width}}  {t.layer:<6} {t.version:>7} {t.rows:>10,}  "
            f"{t.last_operation:<15} {t.last_commit}"
        )
    return "\n".join(lines)
