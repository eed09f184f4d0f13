"""The ``ehrlake`` command line; ``spark-submit jobs/<job>.py`` takes the same arguments.

Every command: ``--help``; exit 0 on success; on failure one clear line on stderr and exit 1
(2 for bad arguments, as argparse does).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

from ehrlake.errors import ConfigError, EhrlakeError

EXIT_FAILURE = 1


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lake", help="lake root directory (default: lake.root of the configuration, ./lake)"
    )
    parser.add_argument("--conf", help="configuration YAML (default: $EHRLAKE_CONF or conf/default.yaml)")
    parser.add_argument(
        "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show Spark's log and full stack traces on errors",
    )  # fmt: skip


def _role(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--role",
        help="act as this role of the access policy (default: $EHRLAKE_ROLE, else security.role of the "
        "configuration)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ehrlake", description="EHR lakehouse on Apache Spark and Delta Lake."
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Spark's own log and full stack traces on errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = sub.add_parser(
        "ingest",
        help="load EHR dumps into bronze Delta tables",
        description="Load new files of one source kind into bronze tables; bad records go "
        "to ops.quarantine with a reason. Re-running adds nothing.",
    )
    ingest.add_argument(
        "--source",
        required=True,
        choices=["fhir-ndjson", "fhir-bundles", "synthea-csv", "csv-extract", "images"],
        help="format of the input files",
    )
    ingest.add_argument(
        "--extract",
        help="with csv-extract: the extract's declaration, conf/extracts/NAME.yaml (e.g. mimic, "
        "diabetes130) or a YAML path",
    )
    ingest.add_argument("--input", required=True, help="a file or a directory (searched recursively)")
    ingest.add_argument(
        "--source-system",
        help="name of the hospital/system the dump came from "
        "(default: ingest.source_system of the configuration)",
    )
    ingest.add_argument(
        "--follow-links",
        action="store_true",
        help="also read symbolic links that lead out of the input folder (skipped and named by default)",
    )
    ingest.add_argument("--json", action="store_true", help="print the run report as JSON")
    _common(ingest)
    _role(ingest)

    clean_cmd = sub.add_parser(
        "clean",
        help="bronze -> silver: every source onto the common clinical model",
        description="Rebuild the silver tables (docs/data_model.md) from bronze: map every source, "
        "normalise codes and units, derive ages, flag inconsistencies. Re-running gives the same tables.",
    )
    clean_cmd.add_argument(
        "--sources",
        default="fhir,synthea,mimic,diabetes130,images",
        help="comma-separated mappings from conf/mappings/ to apply; a mapping whose bronze tables do "
        "not exist is skipped (default: fhir,synthea,mimic,diabetes130,images)",
    )
    _common(clean_cmd)
    _role(clean_cmd)

    quality = sub.add_parser(
        "quality",
        help="data-quality checks over silver and the readiness scorecard",
        description="Run the checks of conf/quality_checks.yaml over silver into gold.dq_results and "
        "rebuild gold.readiness (0-100 per source and per region).",
    )
    quality.add_argument("--checks", help="checks YAML (default: conf/quality_checks.yaml)")
    _common(quality)
    _role(quality)

    eda = sub.add_parser(
        "eda",
        help="silver -> gold: demographics, condition prevalence, utilisation; small cells suppressed",
        description="Build the gold EDA tables from silver. Counts under --k are hidden, with "
        "complementary cells so no hidden count can be recovered from totals.",
    )
    eda.add_argument("--k", type=int, help="smallest count shown (default: security.small_cell_k, 11)")
    eda.add_argument("--years", type=int, default=10, help="years of trends (default 10)")
    eda.add_argument("--top", type=int, default=20, help="conditions in the prevalence table (default 20)")
    _common(eda)
    _role(eda)

    report = sub.add_parser(
        "report",
        help="write a self-contained HTML report from the gold tables",
        description="Plots (population pyramid, condition trends, utilisation, readiness heat map, "
        "missingness) from the suppressed gold tables, in one HTML file.",
    )
    report.add_argument("--out", help="output file (default: report.html in the lake root)")
    _common(report)

    read = sub.add_parser(
        "read",
        help="print rows of a table as a role may see them",
        description="Read a table through the access policy: tables the role may not read are refused, "
        "hidden columns are dropped, sealed identifiers are never opened; the read is audited.",
    )
    read.add_argument("--table", required=True, help="logical table name, e.g. silver.condition")
    read.add_argument("--limit", type=int, default=20, help="at most this many rows (default 20)")
    read.add_argument("--json", action="store_true", help="one JSON object per row")
    _common(read)
    _role(read)

    reveal = sub.add_parser(
        "reveal",
        help="open one patient's identifiers (roles allowed to reveal only; audited)",
        description="Show one patient's rows of a table with sealed identifiers opened. Only roles "
        "with reveal: true may; every reveal, allowed or denied, is written to the audit log.",
    )
    reveal.add_argument("--table", required=True, help="logical table name, e.g. bronze.fhir_patient")
    reveal.add_argument("--patient-key", required=True, help="the pseudonymous patient_key")
    reveal.add_argument("--purpose", required=True, help="why (recorded in the audit log)")
    _common(reveal)
    _role(reveal)

    audit = sub.add_parser("audit", help="the tamper-evident audit log", description="The audit log.")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    verify = audit_sub.add_parser(
        "verify",
        help="check the hash chain, signed checkpoints and witness; exit 1 at the first broken link",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    _common(verify)

    keys = sub.add_parser(
        "keys",
        help="manage encryption keys",
        description="Envelope-encryption keys: "
        "a master key wraps versioned per-table data keys (docs/security.md).",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    init = keys_sub.add_parser("init", help="create the master key file (mode 0600); refuses to overwrite")
    rotate = keys_sub.add_parser("rotate", help="add a new data-key version for a table; new writes use it")
    rotate.add_argument("--table", required=True, help="logical table name, e.g. bronze.fhir_patient")
    rotate.add_argument(
        "--reencrypt",
        action="store_true",
        help="also rewrite the table's sealed columns under the new key, as one new Delta version",
    )
    rotate.add_argument(
        "--lake", help="lake root, with --reencrypt (default: lake.root of the configuration)"
    )
    _role(rotate)  # --reencrypt rewrites the table: a job of a role that may write its layer
    show_keys = keys_sub.add_parser("show", help="key ids and creation times per table (never key material)")
    show_keys.add_argument("--json", action="store_true", help="machine-readable output")
    for p in (init, rotate, show_keys):
        p.add_argument("--conf", help="configuration YAML (default: $EHRLAKE_CONF or conf/default.yaml)")

    grants = sub.add_parser(
        "grants",
        help="who may act in which role: grants signed by a key administrator",
        description="Signed role grants (docs/security.md): once set up, a user acts only in the roles a "
        "grant gives them, whatever --role says.",
    )
    grants_sub = grants.add_subparsers(dest="grants_command", required=True, metavar="SUBCOMMAND")
    grants_init = grants_sub.add_parser(
        "init", help="create the administrator's key pair (private 0600, public in the grants folder)"
    )
    grants_add = grants_sub.add_parser("add", help="sign a grant of roles to an OS user (replaces theirs)")
    grants_add.add_argument("--user", required=True, help="OS user name")
    grants_add.add_argument(
        "--role", action="append", required=True, help="a role of the access policy (repeat)"
    )
    grants_show = grants_sub.add_parser("show", help="users and their granted roles")
    for p in (grants_init, grants_add, grants_show):
        p.add_argument("--conf", help="configuration YAML (default: $EHRLAKE_CONF or conf/default.yaml)")

    lake_cmd = sub.add_parser("lake", help="inspect the lake", description="Inspect the tables of the lake.")
    lake_sub = lake_cmd.add_subparsers(dest="lake_command", required=True, metavar="SUBCOMMAND")
    show = lake_sub.add_parser(
        "show",
        help="every table with layer, Delta version, rows and last operation",
        description="List every Delta table under the lake root.",
    )
    show.add_argument("--json", action="store_true", help="machine-readable output for scripts")
    _common(show)

    synth = sub.add_parser(
        "synth",
        help="generate a population of N patients from the bundled sample records",
        description="Amplify the bundled Synthea records into N distinct patients (ids rewritten, dates "
        "shifted, region re-sampled; optional damaged rows), written as input for ingest.",
    )
    synth.add_argument("--patients", type=int, required=True, help="how many patients to generate")
    synth.add_argument("--out", required=True, help="output directory (replaced)")
    synth.add_argument(
        "--format",
        default="synthea-csv",
        choices=["synthea-csv", "fhir-ndjson", "fhir-bundles"],
        help="output format",
    )
    synth.add_argument("--seed", type=int, default=1, help="the same seed gives the same files")
    synth.add_argument("--fault-rate", type=float, default=0.0, help="share of rows damaged (0-1)")
    synth.add_argument("--regions", help="region distribution YAML (default: conf/synth/india.yaml)")
    synth.add_argument(
        "--tables",
        help="comma-separated event tables to write (default: all; patients and facilities always)",
    )
    synth.add_argument("--conf", help="configuration YAML (default: $EHRLAKE_CONF or conf/default.yaml)")

    features = sub.add_parser(
        "features",
        help="point-in-time feature tables and labels for the prediction tasks",
        description="Rebuild gold.features_patient (per patient x as-of date), gold.features_encounter "
        "(per inpatient stay at discharge), gold.features_diabetes130 and gold.labels (docs/features.md).",
    )
    features.add_argument(
        "--as-of",
        help="comma-separated index dates YYYY-MM-DD (default: 1 January of the 5 latest years whose "
        "12-month follow-up lies inside the data)",
    )
    _common(features)
    _role(features)

    train_cmd = sub.add_parser(
        "train",
        help="train models for a task; each registered as a candidate in gold.model_registry",
        description="Patient-grouped split and cross-validated search, fit, held-out evaluation with "
        "bootstrap intervals, subgroup metrics; every model version registered with its data versions.",
    )
    train_cmd.add_argument("--task", required=True, help="prediction task (docs/features.md)")
    train_cmd.add_argument(
        "--algorithms",
        default="xgboost,logreg,rf",
        help="comma-separated: xgboost, logreg, rf, ann (TensorFlow, deep-learning runtime); "
        "default xgboost,logreg,rf. An image task (conf/deep_learning.yaml) trains its CNN",
    )
    train_cmd.add_argument("--grid", default="small", choices=["tiny", "small", "full"], help="search grid")
    train_cmd.add_argument("--folds", type=int, default=3, help="cross-validation folds (default 3)")
    train_cmd.add_argument("--seed", type=int, default=42, help="split, folds and learners' seed")
    train_cmd.add_argument("--workers", type=int, default=2, help="xgboost.spark workers (default 2)")
    train_cmd.add_argument("--epochs", type=int, help="ann / cnn: epochs (default: conf/deep_learning.yaml)")
    train_cmd.add_argument(
        "--launcher", choices=["horovod", "barrier", "local"], help="ann / cnn: how training is distributed"
    )
    train_cmd.add_argument(
        "--backend", choices=["petastorm", "arrow", "auto"], help="ann / cnn: dataset reader"
    )
    train_cmd.add_argument(
        "--promote",
        action="store_true",
        help="promote the version with the best held-out AUROC to production",
    )
    _common(train_cmd)
    _role(train_cmd)

    evaluate_cmd = sub.add_parser(
        "evaluate",
        help="evaluate a registered model on new data without retraining",
        description="Metrics with 95%% bootstrap intervals, calibration, subgroup gaps and error cells "
        "of a model version, on a new extract file (--input) or its held-out patients.",
    )
    evaluate_cmd.add_argument(
        "--model", required=True, help="model id, e.g. diabetes130_readmission_30d.xgboost"
    )
    evaluate_cmd.add_argument("--version", type=int, help="model version (default: latest)")
    evaluate_cmd.add_argument(
        "--input",
        help="a file of the format the model was trained on (image models: NPZ, PNG folders, DICOM)",
    )
    evaluate_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    _common(evaluate_cmd)
    _role(evaluate_cmd)

    score_cmd = sub.add_parser(
        "score",
        help="score the eligible population as of a date with the task's production model",
        description="Risk score, band, top reasons and model version for every eligible patient, merged "
        "into gold.risk_scores (re-scoring the same date replaces those rows).",
    )
    score_cmd.add_argument("--task", required=True, help="patient-level task, e.g. mortality_12m")
    score_cmd.add_argument("--as-of", default="today", help="index date YYYY-MM-DD or 'today' (default)")
    score_cmd.add_argument("--model", help="model id to use instead of the task's production model")
    score_cmd.add_argument("--version", type=int, help="with --model: the version (default: latest)")
    _common(score_cmd)
    _role(score_cmd)

    images_cmd = sub.add_parser(
        "score-images",
        help="findings of an image model for every image of a source system -> gold.image_findings",
        description="Score silver.imaging rows (any format: NPZ, PNG, DICOM slices) with an image model "
        "version; merged into gold.image_findings with the model id and version.",
    )
    images_cmd.add_argument("--model", required=True, help="image model id, e.g. breastmnist_normal.cnn")
    images_cmd.add_argument("--version", type=int, help="model version (default: latest)")
    images_cmd.add_argument(
        "--source-system", required=True, help="which images (silver.imaging.source_system)"
    )
    _common(images_cmd)
    _role(images_cmd)

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
    where.add_argument("--table", help="a lake table with FHIR records in raw, e.g. bronze.fhir_other")
    view_run.add_argument("--out", help="write the rows to this lake table (overwritten), e.g. gold.my_view")
    view_run.add_argument("--limit", type=int, default=20, help="rows to print without --out (default 20)")
    view_run.add_argument("--json", action="store_true", help="print rows as JSON lines")
    _common(view_run)
    _role(view_run)

    models_cmd = sub.add_parser("models", help="the model registry", description="The model registry.")
    models_sub = models_cmd.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    models_list = models_sub.add_parser("list", help="model versions with task, status and test AUROC")
    models_list.add_argument("--task", help="only this task")
    models_list.add_argument("--json", action="store_true", help="machine-readable output")
    promote = models_sub.add_parser("promote", help="make a model version its task's production model")
    promote.add_argument("--model", required=True, help="model id")
    promote.add_argument("--version", type=int, required=True, help="version")
    for p in (models_list, promote):
        _common(p)

    pipe = sub.add_parser(
        "pipeline",
        help="run declared steps (ehrlake command lines) in one process and one SparkSession",
        description="Run the steps of a pipeline file (e.g. conf/pipelines/demo.yaml) in order, in one "
        "SparkSession; --lake, --conf and --role apply to every step that takes them. The first failing "
        "step stops the run; re-running is safe.",
    )
    pipe.add_argument("file", help="pipeline YAML: steps, a list of ehrlake command lines")
    _common(pipe)
    _role(pipe)
    return parser


def _open_lake(args):
    from ehrlake import config as config_module
    from ehrlake import lake

    config = config_module.load(args.conf).with_lake_root(args.lake)
    return lake.open(config=config), config


def cmd_ingest(args) -> int:
    from ehrlake import ingest

    lake, config = _open_lake(args)
    report = ingest.run(
        lake,
        ingest.SourceKind(args.source),
        args.input,
        # an extract comes from one hospital / data set: its declaration names the default system
        source_system=args.source_system or (None if args.extract else config.ingest.source_system),
        batch_lines=config.ingest.lines_per_batch,
        role=args.role,
        extract=args.extract,
        follow_links=args.follow_links,
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    if not report.balanced:
        print("ehrlake: error: ingest counts do not add up; see the report above", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_clean(args) -> int:
    from ehrlake import clean

    lake, _ = _open_lake(args)
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    missing = [p for p in clean.mapping_files(names) if not p.is_file()]
    if missing:
        raise EhrlakeError(f"no mapping {missing[0]} (sources are files in conf/mappings/)")
    mappings = [m for p in clean.mapping_files(names) for m in clean.load_mappings(p)]
    print(clean.run(lake, mappings, role=args.role).format())
    return 0


def cmd_quality(args) -> int:
    from ehrlake import quality
    from ehrlake.quality import checks

    lake, _ = _open_lake(args)
    if not lake.exists("silver.patient"):
        raise EhrlakeError("no silver tables yet: run ehrlake clean first")
    loaded = checks.load(args.checks) if args.checks else checks.load()
    summary = quality.run(lake, loaded, role=args.role)
    print(
        f"quality run {summary['run_id']}: {summary['checks']} checks, {summary['results']} results "
        f"(check x source), {summary['failed']} over threshold -> gold.dq_results, gold.readiness"
    )
    for row in lake.read("gold.readiness").orderBy("level", "name").collect():
        print(f"  readiness {row.level:<6} {row.name:<24} {row.score:>5}")
    return 0


def cmd_eda(args) -> int:
    from ehrlake.eda import aggregates

    lake, _ = _open_lake(args)
    if not lake.exists("silver.patient"):
        raise EhrlakeError("no silver tables yet: run ehrlake clean first")
    k = args.k or lake.security.small_cell_k
    summary = aggregates.run(lake, k=k, years=args.years, top=args.top, role=args.role)
    for name, counts in summary.items():
        print(f"{name:<30} {counts['cells']:>7,} cells {counts['hidden']:>6,} suppressed (k={k})")
    return 0


def cmd_report(args) -> int:
    from ehrlake.eda import report

    lake, _ = _open_lake(args)
    text = report.render(lake)
    out = args.out or os.path.join(lake.root, "report.html")
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"wrote {out} ({len(text) / 1e3:.0f} kB, {text.count('<img')} plots)")
    return 0


def cmd_read(args) -> int:
    lake, _ = _open_lake(args)
    df = lake.read(args.table, role=args.role or lake.security.default_role)
    rows = df.limit(max(args.limit, 0)).collect()  # bounded: --limit rows reach the driver
    if args.json:
        for row in rows:
            print(json.dumps(row.asDict(recursive=True), default=str))
    else:
        print(f"{args.table}: {', '.join(df.columns)}")
        for row in rows:
            print(" | ".join(_cell(v) for v in row))
    return 0


def _cell(value, width: int = 40) -> str:
    """A value for the terminal: ciphertext shown as its key id, long text cut (--json prints all)."""
    if value is None:
        return ""
    from ehrlake.security.crypto import is_sealed

    text = str(value)
    if is_sealed(text):
        return f"<sealed {text.split(':', 2)[1]}>"
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_reveal(args) -> int:
    lake, _ = _open_lake(args)
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
    lake, _ = _open_lake(args)
    report = lake.security.audit.verify(lake)
    if args.json:
        print(json.dumps({"ok": report.ok, **report.__dict__}, indent=2))
    else:
        print(report.format())
    return 0 if report.ok else EXIT_FAILURE


def cmd_lake_show(args) -> int:
    if args.lake and not os.path.isdir(args.lake):
        raise EhrlakeError(f"lake root {args.lake} does not exist")
    lake, _ = _open_lake(args)
    tables = lake.tables()
    if args.json:
        print(json.dumps({"lake": lake.root, "tables": [t.as_dict() for t in tables]}, indent=2))
        return 0
    print(format_tables(lake.root, tables))
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


def _key_store(args):
    from ehrlake import config as config_module
    from ehrlake.security.columns import KeyRef

    security = config_module.load(args.conf).security
    return KeyRef.from_config(security).store(), security


def cmd_keys_init(args) -> int:
    from ehrlake.security import init_keys

    _, security = _key_store(args)
    made = init_keys(security)
    if not made:
        raise EhrlakeError(
            f"master key {security.master_key_file} and the reveal key exist already; not replacing them"
        )
    for line in made:
        print(f"created {line}")
    return 0


def cmd_keys_rotate(args) -> int:
    from ehrlake.lake.catalog import TableName

    table = str(TableName.parse(args.table))
    store, _ = _key_store(args)
    key_id = store.rotate(table)
    print(f"{key_id} created; new writes to {table} use it, older versions stay readable")
    if args.reencrypt:
        lake, _ = _open_lake(args)
        result = lake.security.reencrypt(lake, table, args.role)
        print(f"{table}: sealed columns rewritten under {key_id} as Delta version {result.version}")
    return 0


def cmd_keys_show(args) -> int:
    store, security = _key_store(args)
    data = {t: store.versions(t) for t in store.tables()}
    if args.json:
        print(json.dumps({"key_store": str(store.directory), "tables": data}, indent=2))
    elif not data:
        print(f"key store {store.directory}: no data keys yet")
    else:
        for table, versions in data.items():
            print(f"{table}: " + ", ".join(f"{v['key_id']} ({v['created_at']})" for v in versions))
    return 0


def _grants(args):
    from pathlib import Path

    from ehrlake import config as config_module
    from ehrlake.security.grants import Grants

    security = config_module.load(args.conf).security
    if not security.grants:
        raise EhrlakeError("security.grants names no folder for role grants in the configuration")
    return Grants(Path(security.grants)), security


def cmd_grants_init(args) -> int:
    grants, security = _grants(args)
    grants.init(security.grant_admin_key)
    print(
        f"created the grant administrator key {security.grant_admin_key} (mode 0600; keep it with the "
        f"administrator) and {grants.public_file}; from now on users act only in granted roles"
    )
    return 0


def cmd_grants_add(args) -> int:
    from ehrlake.security import _policy_path
    from ehrlake.security.access import AccessPolicy

    grants, security = _grants(args)
    known = AccessPolicy.load(_policy_path(security.access_policy)).roles
    unknown = [r for r in args.role if r not in known]
    if unknown:
        raise EhrlakeError(f"unknown role(s) {', '.join(unknown)} (roles: {', '.join(sorted(known))})")
    path = grants.issue(security.grant_admin_key, args.user, args.role)
    print(f"{args.user}: {', '.join(sorted(set(args.role)))} (signed grant {path})")
    return 0


def cmd_grants_show(args) -> int:
    grants, _ = _grants(args)
    shown = grants.show()
    if grants.fingerprint() is None:
        print(f"no role grants set up in {grants.directory} (ehrlake grants init): roles are self-declared")
    for user, roles in shown.items():
        print(f"{user}: {', '.join(roles)}")
    return 0


def cmd_synth(args) -> int:
    from ehrlake import config as config_module
    from ehrlake import synth
    from ehrlake.session import get_spark

    spark = get_spark(config_module.load(args.conf))
    report = synth.run(
        spark,
        args.patients,
        args.out,
        seed=args.seed,
        fault_rate=args.fault_rate,
        fmt=args.format,
        regions=args.regions or synth.DEFAULT_REGIONS,
        tables=tuple(t.strip() for t in args.tables.split(",")) if args.tables else synth.PATIENT_TABLES,
    )
    print(report.format())
    return 0


def _dates(text: str):
    import datetime as dt

    try:
        return [dt.date.fromisoformat(d.strip()) for d in text.split(",") if d.strip()]
    except ValueError as exc:
        raise EhrlakeError(f"dates must be YYYY-MM-DD: {exc}") from None


def cmd_features(args) -> int:
    from ehrlake import features

    lake, _ = _open_lake(args)
    summary = features.run(lake, _dates(args.as_of) if args.as_of else None, role=args.role)
    if summary["as_of"]:
        print(f"index dates {', '.join(summary['as_of'])} (data end {summary['data_end']})")
    for skipped in summary["skipped"]:
        print(f"skipped: {skipped}")
    for table in sorted(k for k in summary if k.startswith("gold.")):
        print(f"{table:<28} {summary[table]:>10,} rows")
    for name, c in sorted(summary["tasks"].items()):
        rate = c["positive"] / c["labelled"] if c["labelled"] else 0.0
        print(
            f"  {name:<30} {c['labelled']:>8,} labelled, {c['positive']:>6,} positive ({rate:.1%}), "
            f"{c['excluded']:>8,} excluded"
        )
    return 0


def cmd_train(args) -> int:
    from ehrlake.training import DeepLearningOptions, train_task

    lake, _ = _open_lake(args)
    trained = train_task(
        lake, args.task, [a.strip() for a in args.algorithms.split(",") if a.strip()],
        grid=args.grid, folds=args.folds, seed=args.seed, workers=args.workers, role=args.role,
        deep=DeepLearningOptions(args.epochs, args.launcher, args.backend), promote=args.promote,
    )  # fmt: skip
    print(f"{'model':<44} {'AUROC (95% CI)':<22} {'AUPRC':>6} {'Brier':>6} {'accuracy':>8}")
    for mv in trained.models:
        m = mv.metrics
        auroc = m["auroc"]
        print(
            f"{mv.label:<44} {auroc['value']:.3f} ({auroc['ci_low']:.3f}-{auroc['ci_high']:.3f})"
            f"   {m['auprc']['value']:>6.3f} {m['brier']['value']:>6.3f} {m['accuracy']['value']:>8.3f}"
        )
    if trained.promoted:
        print(f"promoted {trained.promoted.label} to production for {args.task}")
    return 0


def cmd_evaluate(args) -> int:
    from ehrlake.models import evaluate_model, registry

    lake, _ = _open_lake(args)
    mv = registry.get(lake, args.model, args.version)
    if mv.algorithm == "cnn":
        from ehrlake.dl.predict import evaluate_images

        if not args.input:
            raise EhrlakeError(
                f"{mv.label} is evaluated on a new image set: give --input (NPZ, PNG folder, DICOM)"
            )
        result = evaluate_images(lake, mv, args.input, role=args.role)
    else:
        result = evaluate_model(lake, args.model, args.version, args.input, role=args.role)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']} on {result['dataset']}:")
    for name, m in result["metrics"].items():
        print(f"  {name:<10} {m['value']:.3f}  (95% CI {m['ci_low']:.3f}-{m['ci_high']:.3f}, n={m['n']:,})")
    return 0


def cmd_score(args) -> int:
    import datetime as dt

    from ehrlake import scoring

    lake, _ = _open_lake(args)
    as_of = dt.date.today() if args.as_of == "today" else _dates(args.as_of)[0]
    run = scoring.score(lake, args.task, as_of, role=args.role, model_id=args.model, version=args.version)
    print(run.format())
    return 0


def cmd_score_images(args) -> int:
    from ehrlake.dl import predict
    from ehrlake.models import registry

    lake, _ = _open_lake(args)
    mv = registry.get(lake, args.model, args.version)
    counts = predict.score_source(lake, mv, args.source_system, args.role)
    spread = ", ".join(f"{'positive' if f else 'negative'} {n:,}" for f, n in sorted(counts.items()))
    print(f"{args.source_system}: {spread or 'no images'} with {mv.label} -> {predict.FINDINGS}")
    return 0


def cmd_view_run(args) -> int:
    from ehrlake import views
    from ehrlake.views import job

    view = views.load(args.view)
    lake, _ = _open_lake(args)
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
            print(" | ".join(_cell(v) for v in row))
    return 0


def cmd_models_list(args) -> int:
    from ehrlake.models import registry

    lake, _ = _open_lake(args)
    rows = registry.versions(lake, args.task)
    if args.json:
        print(
            json.dumps([{**r.__dict__, "created_at": str(r.created_at)} for r in rows], indent=2, default=str)
        )
        return 0
    if not rows:
        print("no models yet: run ehrlake train --task TASK")
    for r in rows:
        auroc = r.metrics.get("auroc", {})
        ci = f"{auroc.get('value', 0):.3f} ({auroc.get('ci_low', 0):.3f}-{auroc.get('ci_high', 0):.3f})"
        print(f"{r.label:<44} {r.status:<10} test AUROC {ci}  {r.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_models_promote(args) -> int:
    from ehrlake.models import registry

    lake, _ = _open_lake(args)
    mv = registry.promote(lake, args.model, args.version)
    print(f"{mv.label} is now the production model of {mv.task}")
    return 0


def cmd_pipeline(args) -> int:
    from ehrlake import pipeline, session

    shared = {"lake": args.lake, "conf": args.conf, "role": args.role}
    parsed = {}
    for i, step in enumerate(pipeline.load(args.file), 1):  # every step checked before the first runs
        parsed[step] = parsed_step = _parse_step(args.file, i, step)
        for name, value in shared.items():  # the pipeline's options, where the step takes them
            if value is not None and hasattr(parsed_step, name) and getattr(parsed_step, name) is None:
                setattr(parsed_step, name, value)
        try:
            session.require_runtime(parsed_step.command)
        except EhrlakeError as exc:
            raise ConfigError(f"{args.file}: step {i} ({step}): {exc}") from None
    pipeline.run(list(parsed), lambda step: _dispatch(parsed[step]))
    return 0


def _parse_step(path: str, number: int, step) -> argparse.Namespace:
    """One pipeline step's command line, parsed as the CLI would; a mistake is one line naming the
    file and step (argparse's own message, without its usage text)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(list(step.argv))
    except SystemExit:
        said = [line for line in errors.getvalue().splitlines() if line.strip()]
        reason = said[-1].split("error: ", 1)[-1] if said else "not an ehrlake command line"
        raise ConfigError(f"{path}: step {number} ({step}): {reason}") from None


COMMANDS = {
    "ingest": cmd_ingest,
    "synth": cmd_synth,
    ("lake", "show"): cmd_lake_show,
    ("keys", "init"): cmd_keys_init,
    ("keys", "rotate"): cmd_keys_rotate,
    ("keys", "show"): cmd_keys_show,
    ("grants", "init"): cmd_grants_init,
    ("grants", "add"): cmd_grants_add,
    ("grants", "show"): cmd_grants_show,
    "clean": cmd_clean,
    "eda": cmd_eda,
    "quality": cmd_quality,
    "report": cmd_report,
    "read": cmd_read,
    "reveal": cmd_reveal,
    ("audit", "verify"): cmd_audit_verify,
    "features": cmd_features,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "score": cmd_score,
    "score-images": cmd_score_images,
    ("models", "list"): cmd_models_list,
    ("view", "run"): cmd_view_run,
    ("models", "promote"): cmd_models_promote,
    "pipeline": cmd_pipeline,
}


def _handler(args):
    sub = {
        "lake": "lake_command",
        "keys": "keys_command",
        "grants": "grants_command",
        "audit": "audit_command",
        "models": "models_command",
        "view": "view_command",
    }.get(args.command)
    return COMMANDS[(args.command, getattr(args, sub)) if sub else args.command]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["EHRLAKE_DEBUG"] = "1"
    # Spark's log off unless asked for: a failure is this command's one line, not a page of JVM frames
    os.environ.setdefault("EHRLAKE_SPARK_LOG", "WARN" if args.verbose else "OFF")
    return _dispatch(args)


def _dispatch(args) -> int:
    """Run one parsed command; its failure is one line on stderr and exit status 1."""
    from ehrlake import session

    try:
        session.require_runtime(args.command)
        return _handler(args)(args)
    except EhrlakeError as exc:
        print(f"ehrlake: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("ehrlake: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: still one clear line, with the type for a bug report
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if type(exc).__name__ == "PySparkImportError" and "PyArrow" in first:  # e.g. train --algorithms rf
            print(f"ehrlake: error: {session.wrong_runtime(args.command)}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"ehrlake: error: {type(exc).__name__}: {first[:500]}", file=sys.stderr)
        if os.environ.get("EHRLAKE_DEBUG"):
            raise
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
