"""Commands of the pipeline's stages: ingest, synth, clean, quality, eda, report, features, sequences."""

from __future__ import annotations

import json
import os
import sys

from ehrlake.cli import common
from ehrlake.errors import EhrlakeError


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
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
    common.lake_options(ingest)
    common.role_option(ingest)
    ingest.set_defaults(handler=cmd_ingest)

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
    synth.add_argument(
        "--template-source-system",
        help="source system the sample records were ingested under, named in _lineage so each copy's "
        "template is known (default: ingest.source_system of the configuration)",
    )
    synth.add_argument("--conf", help="configuration YAML (default: $EHRLAKE_CONF or conf/default.yaml)")
    synth.set_defaults(handler=cmd_synth)

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
    clean_cmd.add_argument(
        "--incremental",
        action="store_true",
        help="recompute only the patients whose bronze rows changed since the last clean (ops.watermarks) "
        "and merge their rows into silver; a table that cannot be brought up to date so is rebuilt",
    )
    common.lake_options(clean_cmd)
    common.role_option(clean_cmd)
    clean_cmd.set_defaults(handler=cmd_clean)

    quality = sub.add_parser(
        "quality",
        help="data-quality checks over silver and the readiness scorecard",
        description="Run the checks of conf/quality_checks.yaml over silver into gold.dq_results and "
        "rebuild gold.readiness (0-100 per source and per region).",
    )
    quality.add_argument("--checks", help="checks YAML (default: conf/quality_checks.yaml)")
    common.lake_options(quality)
    common.role_option(quality)
    quality.set_defaults(handler=cmd_quality)

    eda = sub.add_parser(
        "eda",
        help="silver -> gold: demographics, condition prevalence, utilisation; small cells suppressed",
        description="Build the gold EDA tables from silver. Counts under --k are hidden, with "
        "complementary cells so no hidden count can be recovered from totals.",
    )
    eda.add_argument("--k", type=int, help="smallest count shown (default: security.small_cell_k, 11)")
    eda.add_argument("--years", type=int, default=10, help="years of trends (default 10)")
    eda.add_argument("--top", type=int, default=20, help="conditions in the prevalence table (default 20)")
    common.lake_options(eda)
    common.role_option(eda)
    eda.set_defaults(handler=cmd_eda)

    report = sub.add_parser(
        "report",
        help="write a self-contained HTML report from the gold tables",
        description="Plots (population pyramid, condition trends, utilisation, readiness heat map, "
        "missingness) from the suppressed gold tables, in one HTML file.",
    )
    report.add_argument("--out", help="output file (default: report.html in the lake root)")
    common.lake_options(report)
    report.set_defaults(handler=cmd_report)

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
    features.add_argument(
        "--incremental",
        action="store_true",
        help="recompute only the patients whose silver rows changed since the last run (ops.watermarks) "
        "or whose labels the data's new end decides, and merge their rows; otherwise rebuild",
    )
    common.lake_options(features)
    common.role_option(features)
    features.set_defaults(handler=cmd_features)

    seqs = sub.add_parser(
        "sequences",
        help="patient event sequences and their vocabulary, for sequence models",
        description="Rebuild gold.sequence_vocabulary and gold.sequences from silver: per index of "
        "gold.features_patient and per patient's whole record, the time-ordered tokens of what happened "
        "before the index (conf/sequences.yaml, docs/self_supervised.md).",
    )
    common.lake_options(seqs)
    common.role_option(seqs)
    seqs.set_defaults(handler=cmd_sequences)


def cmd_ingest(args) -> int:
    from ehrlake import ingest

    lake, config = common.open_lake(args)
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
        return common.EXIT_FAILURE
    return 0


def cmd_synth(args) -> int:
    from ehrlake import config as config_module
    from ehrlake import synth
    from ehrlake.session import get_spark

    config = config_module.load(args.conf)
    spark = get_spark(config)
    report = synth.run(
        spark,
        args.patients,
        args.out,
        seed=args.seed,
        fault_rate=args.fault_rate,
        fmt=args.format,
        regions=args.regions or synth.DEFAULT_REGIONS,
        tables=tuple(t.strip() for t in args.tables.split(",")) if args.tables else synth.PATIENT_TABLES,
        template_source_system=args.template_source_system or config.ingest.source_system,
    )
    print(report.format())
    return 0


def cmd_clean(args) -> int:
    from ehrlake import clean

    lake, _ = common.open_lake(args)
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    missing = [p for p in clean.mapping_files(names) if not p.is_file()]
    if missing:
        raise EhrlakeError(f"no mapping {missing[0]} (sources are files in conf/mappings/)")
    mappings = [m for p in clean.mapping_files(names) for m in clean.load_mappings(p)]
    print(clean.run(lake, mappings, role=args.role, incremental=args.incremental).format())
    return 0


def cmd_quality(args) -> int:
    from ehrlake import quality
    from ehrlake.quality import checks

    lake, _ = common.open_lake(args)
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

    lake, _ = common.open_lake(args)
    if not lake.exists("silver.patient"):
        raise EhrlakeError("no silver tables yet: run ehrlake clean first")
    k = args.k or lake.security.small_cell_k
    summary = aggregates.run(lake, k=k, years=args.years, top=args.top, role=args.role)
    for name, counts in summary.items():
        print(f"{name:<30} {counts['cells']:>7,} cells {counts['hidden']:>6,} suppressed (k={k})")
    return 0


def cmd_report(args) -> int:
    from ehrlake.eda import report

    lake, _ = common.open_lake(args)
    text = report.render(lake)
    out = args.out or os.path.join(lake.root, "report.html")
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"wrote {out} ({len(text) / 1e3:.0f} kB, {text.count('<img')} plots)")
    return 0


def cmd_sequences(args) -> int:
    from ehrlake.features import sequences

    lake, _ = common.open_lake(args)
    s = sequences.run(lake, role=args.role)
    print(
        f"{sequences.VOCABULARY:<28} {s['vocabulary']:>10,} tokens  (version {s['vocabulary_version']})\n"
        f"{sequences.SEQUENCES:<28} {s['sequences']:>10,} rows    ({s['patients']:,} patients' whole records "
        f"and the features' indexes)\n"
        f"  tokens {s['tokens']:,}: median length {s['median_length']}, longest {s['longest']}, "
        f"{s['truncated_share']:.1%} cut to the most recent, {s['unknown_share']:.1%} unknown (rare codes)"
    )
    return 0


def cmd_features(args) -> int:
    from ehrlake import features

    lake, _ = common.open_lake(args)
    summary = features.run(
        lake, common.dates(args.as_of) if args.as_of else None, role=args.role, incremental=args.incremental
    )
    if summary["as_of"]:
        print(f"index dates {', '.join(summary['as_of'])} (data end {summary['data_end']})")
    for skipped in summary["skipped"]:
        print(f"skipped: {skipped}")
    for table in sorted(k for k in summary if k.startswith("gold.")):
        print(f"{table:<28} {summary[table]:>10,} rows  {summary['how'][table]}")
    for name, c in sorted(summary["tasks"].items()):
        rate = c["positive"] / c["labelled"] if c["labelled"] else 0.0
        print(
            f"  {name:<30} {c['labelled']:>8,} labelled, {c['positive']:>6,} positive ({rate:.1%}), "
            f"{c['excluded']:>8,} excluded"
        )
    return 0
