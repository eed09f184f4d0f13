"""Commands of models and their use: train, pretrain, evaluate, score, score-images, hierarchy, estimate,
models."""

from __future__ import annotations

import json

from ehrlake.cli import common
from ehrlake.errors import EhrlakeError


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
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
        help="comma-separated: xgboost, logreg, rf, ann, sequence, sequence_scratch (the last three "
        "TensorFlow, deep-learning runtime; sequence fine-tunes the pretrained encoder); "
        "default xgboost,logreg,rf. An image task (conf/deep_learning.yaml) trains its CNN: cnn (from "
        "random weights, the default) and / or cnn_pretrained (from ehrlake pretrain --images)",
    )
    train_cmd.add_argument("--grid", default="small", choices=["tiny", "small", "full"], help="search grid")
    train_cmd.add_argument("--folds", type=int, default=3, help="cross-validation folds (default 3)")
    train_cmd.add_argument("--seed", type=int, default=42, help="split, folds and learners' seed")
    train_cmd.add_argument("--workers", type=int, default=2, help="xgboost.spark workers (default 2)")
    train_cmd.add_argument(
        "--xgboost-on",
        choices=["auto", "spark"],
        default="auto",
        help="auto: XGBoost fits on at most 1,000,000 rows run on the driver, larger ones on --workers "
        "Spark tasks (docs/features.md measures why); spark: on Spark at every size",
    )
    train_cmd.add_argument("--epochs", type=int, help="ann / cnn: epochs (default: conf/deep_learning.yaml)")
    train_cmd.add_argument(
        "--launcher", choices=["horovod", "barrier", "local"], help="ann / cnn: how training is distributed"
    )
    train_cmd.add_argument(
        "--backend", choices=["petastorm", "arrow", "auto"], help="ann / cnn: dataset reader"
    )
    train_cmd.add_argument(
        "--label-fraction",
        type=float,
        default=1.0,
        help="sequence / sequence_scratch / cnn / cnn_pretrained: keep this share of the training labels "
        "(stratified; a point of a label-efficiency curve, plotted in the report)",
    )
    train_cmd.add_argument(
        "--label-seed",
        type=int,
        help="with --label-fraction: which patients' (images') labels are kept and the fit's seed (default: "
        "--seed; vary this, not --seed, for the same test patients)",
    )
    train_cmd.add_argument(
        "--with-feedback",
        action="store_true",
        help="training rows a clinician reviewed (ehrlake review decide) take the reviewed label, "
        "weighted by conf/review.yaml's feedback_weight; the test split keeps the outcome",
    )
    train_cmd.add_argument(
        "--promote",
        action="store_true",
        help="nominate the version with the best held-out AUROC for production: a reviewer's approval "
        "(ehrlake models approve) makes it the production model",
    )
    common.lake_options(train_cmd)
    common.role_option(train_cmd)
    train_cmd.set_defaults(handler=cmd_train)

    pretrain_cmd = sub.add_parser(
        "pretrain",
        help="pretrain the sequence encoder on every patient's record, labels unused (deep-learning runtime)",
        description="Masked-code pretraining of a small transformer over gold.sequences (run ehrlake "
        "sequences first), distributed like the ANN and CNN; registered as sequences.encoder with the "
        "vocabulary and data versions it read (docs/self_supervised.md).",
    )
    pretrain_cmd.add_argument(
        "--epochs", type=int, help="epochs (default: encoder.epochs of conf/deep_learning.yaml)"
    )
    pretrain_cmd.add_argument("--workers", type=int, help="training workers (default: runtime.workers)")
    pretrain_cmd.add_argument(
        "--launcher", choices=["horovod", "barrier", "local"], help="how it is distributed"
    )
    pretrain_cmd.add_argument("--seed", type=int, default=42, help="split, masks and weights' seed")
    pretrain_cmd.add_argument(
        "--images",
        action="store_true",
        help="instead: contrastive (SimCLR) pretraining of the CNN trunk on every image of silver.imaging "
        "outside a test split, registered as images.encoder",
    )
    common.lake_options(pretrain_cmd)
    common.role_option(pretrain_cmd)
    pretrain_cmd.set_defaults(handler=cmd_pretrain)

    explain_cmd = sub.add_parser(
        "explain",
        help="one patient's risk from a sequence model, the events behind it and similar patients' "
        "outcomes (deep-learning runtime)",
        description="Decision support for one patient: the risk and model version, the events that raised "
        "or lowered it (integrated gradients), and the outcome rate among the most similar training "
        "patients (shown only when at least security.small_cell_k exist); merged into "
        "gold.decision_support and audited (docs/self_supervised.md).",
    )
    explain_cmd.add_argument("--patient-key", required=True, help="the pseudonymous patient_key")
    explain_cmd.add_argument("--task", required=True, help="patient-level task, e.g. readmission_30d")
    explain_cmd.add_argument(
        "--as-of", default="today", help="date YYYY-MM-DD: events before it are read (default: today)"
    )
    explain_cmd.add_argument(
        "--model", help="model id (default: the task's production sequence model, else <task>.sequence)"
    )
    explain_cmd.add_argument("--version", type=int, help="with --model: the version (default: latest)")
    explain_cmd.add_argument("--json", action="store_true", help="the gold.decision_support row as JSON")
    common.lake_options(explain_cmd)
    common.role_option(explain_cmd)
    explain_cmd.set_defaults(handler=cmd_explain)

    evaluate_cmd = sub.add_parser(
        "evaluate",
        help="evaluate a registered model on new data without retraining",
        description="Metrics with 95% bootstrap intervals, calibration, subgroup gaps and error cells "
        "of a model version, on a new extract file (--input) or its held-out patients.",
    )
    evaluate_cmd.add_argument(
        "--model", required=True, help="model id, e.g. diabetes130_readmission_30d.xgboost"
    )
    evaluate_cmd.add_argument("--version", type=int, help="model version (default: latest)")
    evaluate_cmd.add_argument(
        "--input",
        help="new data: an extract file of the format the model was trained on; for a model of silver "
        "features or sequences, a new hospital's dump (FHIR NDJSON, FHIR bundles or Synthea CSV), ingested "
        "into <lake>/_external/<folder name> first; image models: NPZ, PNG folders, DICOM",
    )
    evaluate_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    common.lake_options(evaluate_cmd)
    common.role_option(evaluate_cmd)
    evaluate_cmd.set_defaults(handler=cmd_evaluate)

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
    score_cmd.add_argument(
        "--incremental",
        action="store_true",
        help="re-score only the patients whose silver rows changed since this date was last scored "
        "with the same model (everyone when that cannot be told)",
    )
    common.lake_options(score_cmd)
    common.role_option(score_cmd)
    score_cmd.set_defaults(handler=cmd_score)

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
    common.lake_options(images_cmd)
    common.role_option(images_cmd)
    images_cmd.set_defaults(handler=cmd_score_images)

    hierarchy_cmd = sub.add_parser(
        "hierarchy",
        help="patient progress hierarchies: a decision tree per care programme",
        description="Per care programme of conf/hierarchy.yaml (diabetes, hypertension, CKD): a "
        "depth-limited decision tree over the point-in-time features, every leaf at least k "
        "patients, its nodes in words in gold.hierarchy_nodes, every cohort row's node and move in "
        "gold.patient_progress (docs/hierarchy.md).",
    )
    hierarchy_sub = hierarchy_cmd.add_subparsers(
        dest="hierarchy_command", required=True, metavar="SUBCOMMAND"
    )
    hierarchy_build = hierarchy_sub.add_parser("build", help="fit, register and describe a programme's tree")
    hierarchy_show = hierarchy_sub.add_parser("show", help="a programme's latest tree as text")
    hierarchy_build.add_argument("--programme", help="one programme (default: every programme)")
    hierarchy_show.add_argument("--programme", required=True, help="the programme, e.g. diabetes")
    for p in (hierarchy_build, hierarchy_show):
        common.lake_options(p)
        common.role_option(p)
    hierarchy_build.set_defaults(handler=cmd_hierarchy_build)
    hierarchy_show.set_defaults(handler=cmd_hierarchy_show)

    estimate_cmd = sub.add_parser(
        "estimate",
        help="ANN estimates of missing labs, beside the observations (record update)",
        description="Estimate each feature row's missing labs with the registered panel model (a "
        "masked-value MLP per lab with 80% conformal intervals; trained first if there is none) into "
        "silver.observation_estimates, never over an observation. Only rows whose inputs changed are "
        "re-estimated; estimates of changed or since-measured rows are marked superseded "
        "(docs/record_update.md).",
    )
    estimate_cmd.add_argument("--retrain", action="store_true", help="train a new panel model first")
    common.lake_options(estimate_cmd)
    common.role_option(estimate_cmd)
    estimate_cmd.set_defaults(handler=cmd_estimate)

    models_cmd = sub.add_parser("models", help="the model registry", description="The model registry.")
    models_sub = models_cmd.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    models_list = models_sub.add_parser("list", help="model versions with task, status and test AUROC")
    models_list.add_argument("--task", help="only this task")
    models_list.add_argument("--json", action="store_true", help="machine-readable output")
    approve = models_sub.add_parser(
        "approve",
        help="a reviewer's approval (or --reject) of a model version, kept with the model",
        description="Record a reviewer's decision on a model version in gold.model_approvals (audited). "
        "Approving the task's nominated version (train --promote) makes it the production model. The "
        "role that trained a model may not decide on it; the default policy lets only 'reviewer' decide.",
    )
    which = approve.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model id")
    which.add_argument("--task", help="the task's nominated version")
    approve.add_argument("--version", type=int, help="with --model: the version (default: the latest)")
    approve.add_argument("--note", required=True, help="why: kept with the decision and on the model card")
    approve.add_argument("--reject", action="store_true", help="record a rejection instead")
    promote = models_sub.add_parser(
        "promote",
        help="make an approved model version its task's production model",
        description="Make a model version its task's production model (audited); refused without a "
        "reviewer's approval (ehrlake models approve).",
    )
    promote.add_argument("--model", required=True, help="model id")
    promote.add_argument("--version", type=int, required=True, help="version")
    card = models_sub.add_parser(
        "card",
        help="write a model version's card (Markdown and HTML)",
        description="Intended use, inputs and accepted ranges, population and data versions, metrics "
        "with intervals, subgroups, calibration, limitations and approvals, from the lake.",
    )
    card.add_argument("--model", required=True, help="model id")
    card.add_argument("--version", type=int, help="version (default: the latest)")
    card.add_argument("--out", help="folder for card.md and card.html (default: beside the model's artifact)")
    for p in (models_list, approve, promote, card):
        common.lake_options(p)
    for p in (approve, promote):
        common.role_option(p)
    models_list.set_defaults(handler=cmd_models_list)
    approve.set_defaults(handler=cmd_models_approve)
    promote.set_defaults(handler=cmd_models_promote)
    card.set_defaults(handler=cmd_models_card)


def cmd_train(args) -> int:
    from ehrlake.models import evaluate
    from ehrlake.training import DeepLearningOptions, train_task

    lake, _ = common.open_lake(args)
    trained = train_task(
        lake, args.task, [a.strip() for a in args.algorithms.split(",") if a.strip()],
        grid=args.grid, folds=args.folds, seed=args.seed, workers=args.workers, role=args.role,
        deep=DeepLearningOptions(
            args.epochs, args.launcher, args.backend, args.label_fraction, args.label_seed
        ),
        promote=args.promote, with_feedback=args.with_feedback,
        xgboost_driver_rows=0 if args.xgboost_on == "spark" else None,
    )  # fmt: skip
    value = evaluate.format_value
    print(f"{'model':<44} {'AUROC (95% CI)':<22} {'AUPRC':>6} {'Brier':>6} {'accuracy':>8}")
    undefined = []
    for mv in trained.models:
        m = {name: v.get("value") for name, v in mv.metrics.items() if isinstance(v, dict)}
        auroc = mv.metrics["auroc"]
        if auroc["value"] is None:  # a test split of one class: said why under the table
            undefined.append(f"  {mv.label}: {mv.headline()}")
            shown = "undefined"
        else:
            shown = f"{value(auroc['value'])} ({value(auroc['ci_low'])}-{value(auroc['ci_high'])})"
        scores = f"{value(m['auprc']):>6} {value(m['brier']):>6} {value(m['accuracy']):>8}"
        print(f"{mv.label:<44} {shown:<22} {scores}")
    for line in undefined:
        print(line)
    used = next((mv.params.get("feedback") for mv in trained.models if mv.params.get("feedback")), None)
    if args.with_feedback:
        print(
            f"clinician feedback: {used['rows']:,} reviewed training rows, {used['changed']:,} labels "
            f"changed, weight {used['weight']:g}"
            if used
            else "clinician feedback: applies to the Spark ML learners only (none trained here)"
        )
    if trained.promoted:
        mv = trained.promoted
        print(
            f"nominated {mv.label} for production of {args.task}: a reviewer reads its card (ehrlake models "
            f"card --model {mv.model_id}) and approves it (ehrlake models approve --task {args.task} --note "
            "'...' --role reviewer)"
        )
    return 0


def cmd_pretrain(args) -> int:
    from ehrlake.dl import pretrain
    from ehrlake.features.sequences import VOCABULARY

    lake, _ = common.open_lake(args)
    if args.images:
        from ehrlake.dl import contrastive

        mv = contrastive.pretrain_images(
            lake,
            epochs=args.epochs,
            workers=args.workers,
            launcher=args.launcher,
            seed=args.seed,
            role=args.role,
        )
        m, p = mv.metrics, mv.params
        loss, pairs = m["contrastive_loss"], m["pair_accuracy"]
        print(
            f"{mv.label}: CNN trunk {p['filters']} on {mv.training_data[contrastive.IMAGES]} (silver.imaging "
            f"version), {p['epochs']} epochs on {p['workers']} {p['launcher']} workers in "
            f"{m['train_seconds']['value']} s\n  held-out images, {m['validation_images']['value']:,}: "
            f"NT-Xent {loss['value']:.3f} (untrained {loss['untrained']:.3f}), views paired "
            f"{pairs['value']:.1%} (untrained {pairs['untrained']:.1%})"
        )
        return 0
    mv = pretrain.pretrain(
        lake, epochs=args.epochs, workers=args.workers, launcher=args.launcher, seed=args.seed, role=args.role
    )
    m, p = mv.metrics, mv.params
    loss, accuracy, vocabulary = (
        m["masked_code_loss"],
        m["masked_code_accuracy"],
        mv.training_data[VOCABULARY],
    )
    print(
        f"{mv.label}: {p['layers']} layers x {p['dim']} dims over the last {p['length']} tokens, "
        f"vocabulary {p['vocab_size']} (version {vocabulary}), {p['epochs']} epochs on {p['workers']} "
        f"{p['launcher']} workers in {m['train_seconds']['value']} s\n"
        f"  held-out records, {m['masked_codes']['value']:,} masked codes: loss {loss['value']:.2f} nats "
        f"(codes' frequencies {loss['frequency']:.2f}, untrained {loss['untrained']:.2f}), top-1 accuracy "
        f"{accuracy['value']:.1%} (the most frequent code {accuracy['frequency']:.1%})"
    )
    return 0


def cmd_explain(args) -> int:
    import datetime as dt

    from ehrlake.dl import decision

    lake, _ = common.open_lake(args)
    as_of = dt.date.today() if args.as_of == "today" else common.dates(args.as_of)[0]
    result = decision.explain(lake, args.patient_key, args.task, as_of, args.role, args.model, args.version)
    print(json.dumps(result.row, default=str, indent=2) if args.json else result.format())
    return 0


def cmd_evaluate(args) -> int:
    from ehrlake.models import evaluate, evaluate_model, external, registry

    lake, _ = common.open_lake(args)
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
    loaded = external.format_ingest(result.get("ingest"))
    if "next" in result:  # prepared here; a TensorFlow model is scored in the deep-learning runtime
        done = "prepared" if result["prepared"] == "now" else "was prepared already"
        print(f"{args.input} {done} as dataset {result['dataset']}; {result['model']} is a TensorFlow "
              f"model, evaluated in the deep-learning runtime: {result['next']}")  # fmt: skip
        if loaded:
            print(loaded)
        return 0
    print(f"{result['model']} on {result['dataset']}:" + (f"\n{loaded}" if loaded else ""))
    value = evaluate.format_value
    for name, m in result["metrics"].items():
        print(
            f"  {name:<10} {value(m['value'])}  (95% CI {value(m['ci_low'])}-{value(m['ci_high'])}, "
            f"n={m['n']:,})"
        )
    return 0


def cmd_score(args) -> int:
    import datetime as dt

    from ehrlake import scoring

    lake, _ = common.open_lake(args)
    as_of = dt.date.today() if args.as_of == "today" else common.dates(args.as_of)[0]
    run = scoring.score(
        lake,
        args.task,
        as_of,
        role=args.role,
        model_id=args.model,
        version=args.version,
        incremental=args.incremental,
    )
    print(run.format())
    return 0


def cmd_score_images(args) -> int:
    from ehrlake.dl import predict
    from ehrlake.models import registry

    lake, _ = common.open_lake(args)
    mv = registry.get(lake, args.model, args.version)
    counts, refused = predict.score_source(lake, mv, args.source_system, args.role)
    spread = ", ".join(f"{'positive' if f else 'negative'} {n:,}" for f, n in sorted(counts.items()))
    print(f"{args.source_system}: {spread or 'no images scored'} with {mv.label} -> {predict.FINDINGS}")
    if refused:
        kinds = ", ".join(f"{n:,} {m}" for m, n in sorted(refused.items()))
        print(
            f"  refused {sum(refused.values()):,} image(s) of another modality ({kinds}): "
            f"{mv.label} reads {', '.join(predict.modalities(mv))}"
        )
    return 0


def cmd_hierarchy_build(args) -> int:
    from ehrlake import hierarchy

    lake, _ = common.open_lake(args)
    settings = hierarchy.load()
    for name in [args.programme] if args.programme else list(settings.programmes):
        try:
            hierarchy.build(lake, name, role=args.role, settings=settings)
        except EhrlakeError as e:  # every programme: one without the data for a tree says so, the rest go on
            if args.programme:
                raise
            print(f"{name}: no tree ({e})")
            continue
        print(hierarchy.show(lake, name, settings=settings))
    return 0


def cmd_estimate(args) -> int:
    from ehrlake import estimates

    lake, _ = common.open_lake(args)
    got = estimates.run(lake, role=args.role, retrain=args.retrain)
    superseded = ", ".join(f"{n} {why}" for why, n in sorted(got["superseded"].items())) or "none"
    read = "every patient" if got["patients_read"] is None else f"{got['patients_read']:,} changed patients"
    print(
        f"{estimates.TABLE}: read {read}; {got['estimates_written']:,} estimates "
        f"({got['estimates_of_stale_values']:,} of stale values) for "
        f"{got['rows_estimated']:,} patient x as-of rows with {got['model']}; superseded: {superseded}; "
        f"{got['active']:,} active"
    )
    return 0


def cmd_hierarchy_show(args) -> int:
    from ehrlake import hierarchy

    lake, _ = common.open_lake(args)
    print(hierarchy.show(lake, args.programme, role=args.role))
    return 0


def cmd_models_list(args) -> int:
    from ehrlake.models import registry

    lake, _ = common.open_lake(args)
    rows = registry.versions(lake, args.task)
    if args.json:
        print(
            json.dumps([{**r.__dict__, "created_at": str(r.created_at)} for r in rows], indent=2, default=str)
        )
        return 0
    if not rows:
        print("no models yet: run ehrlake train --task TASK")
    for r in rows:
        print(f"{r.label:<44} {r.status:<10} {r.headline()}  {r.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_models_approve(args) -> int:
    from ehrlake.models import governance, registry

    lake, _ = common.open_lake(args)
    if args.task:
        nominated = [m for m in registry.versions(lake, args.task) if m.status == registry.NOMINATED]
        if not nominated:
            raise EhrlakeError(
                f"no nominated model of {args.task}: train --task {args.task} --promote nominates one"
            )
        model_id, version = nominated[-1].model_id, nominated[-1].version
    else:
        model_id, version = args.model, args.version
    mv = governance.decide(lake, model_id, version, args.role, args.note, approve=not args.reject)
    decision = "rejected" if args.reject else "approved"
    print(
        f"{mv.label} {decision}"
        + (f": now the production model of {mv.task}" if mv.status == "production" else "")
    )
    return 0


def cmd_models_promote(args) -> int:
    from ehrlake.models import governance

    lake, _ = common.open_lake(args)
    mv = governance.promote(lake, args.model, args.version, args.role)
    print(f"{mv.label} is now the production model of {mv.task}")
    return 0


def cmd_models_card(args) -> int:
    from ehrlake.models import card

    lake, _ = common.open_lake(args)
    markdown, page = card.write(lake, args.model, args.version, args.out)
    print(f"model card: {markdown} and {page}")
    return 0
