#!/usr/bin/env bash
# The pipeline that exists so far, end to end, on the bundled sample data and the embedded default
# (local[*], lake under ./lake). Re-running it is safe: ingest skips files it has already loaded.
set -euo pipefail
lake="${1:-./lake}"
bin="$(dirname "$0")/../.venv/bin"
dlbin="$(dirname "$0")/../.venv-dl/bin"   # the deep-learning runtime (make dl-env)
run() { echo; echo "\$ ehrlake $*"; "$bin/ehrlake" "$@" --lake "$lake"; }
dl() { echo; echo "\$ .venv-dl/bin/ehrlake $*"; "$dlbin/ehrlake" "$@" --lake "$lake"; }

# Identifiers are sealed under keys kept outside the lake (conf/default.yaml: ./secrets): a master key
# for what jobs read, a reveal key pair for names and identifiers (only `ehrlake reveal` opens those).
if [ -z "${EHRLAKE_MASTER_KEY:-}" ] && [ -z "${EHRLAKE_CONF:-}" ] && [ ! -f secrets/reveal.key ]; then
  echo "\$ ehrlake keys init"; "$bin/ehrlake" keys init
fi
# Roles are bound to OS users by grants a key administrator signs (here: you, for every role).
me="$(id -un)"
if [ -z "${EHRLAKE_CONF:-}" ] && { [ ! -f secrets/grants/admin.pub ] || ! grep -q site:other "secrets/grants/$me.grant.json" 2>/dev/null; }; then
  # (a grant made before the federated sites' roles existed is issued again with them)
  [ -f secrets/grants/admin.pub ] || { echo "\$ ehrlake grants init"; "$bin/ehrlake" grants init; }
  echo "\$ ehrlake grants add --user $me --role engineer --role analyst --role scheduler --role clinician --role reviewer --role auditor --role site:emergency --role site:referral --role site:other"
  "$bin/ehrlake" grants add --user "$me" --role engineer --role analyst --role scheduler --role clinician --role reviewer --role auditor \
    --role site:emergency --role site:referral --role site:other
fi
# The samples hold no Indian patients: 1,500 generated ones (copies of the sample patients, new ids and
# dates, the four most populous states weighted by population) give the NFHS-5 comparison and state
# readiness content. Labelled by their source system; never a test split (docs/features.md).
if [ ! -f gen/india/_manifest.json ]; then
  echo; echo "\$ ehrlake synth --patients 1500 --seed 7 --regions conf/synth/india_demo.yaml --out gen/india"
  "$bin/ehrlake" synth --patients 1500 --seed 7 --regions conf/synth/india_demo.yaml --out gen/india | tail -1
fi
# Ingest every sample, clean, quality, EDA, features, training: declared steps in one SparkSession.
run pipeline conf/pipelines/demo.yaml
if [ -x "$dlbin/ehrlake" ]; then
  # TensorFlow on Horovod-on-Spark (2 workers); short runs here, docs/deep_learning.md for the full ones
  dl train --task diabetes130_readmission_30d --algorithms ann --epochs 10
  # the same ANN across the three sites with Flower, each SuperNode in this runtime (docs/federated.md)
  dl federated train --task diabetes130_readmission_30d --model ann --rounds 5
  dl pretrain --epochs 5   # the sequence encoder, labels unused (docs/self_supervised.md)
  # decision support: the encoder fine-tuned for 30-day readmission, then one readmitted patient's
  # risk at discharge explained to a clinician. The samples' test patients hold no readmission (one
  # real patient has one; generated copies never enter a test split), so its test AUROC is undefined here:
  # the demo shows the output, docs/self_supervised.md what the models are worth.
  dl train --task readmission_30d --algorithms sequence --epochs 5
  stay=$("$bin/ehrlake" sql "SELECT patient_key, CAST(CAST(index_time AS DATE) AS STRING) AS as_of FROM gold.labels
    WHERE task = 'readmission_30d' AND label = 1 ORDER BY index_time DESC, patient_key LIMIT 1" \
    --role clinician --json --lake "$lake")
  read -r key as_of < <("$bin/python" -c 'import json, sys; r = json.loads(sys.argv[1]); print(r["patient_key"], r["as_of"])' "$stay")
  dl explain --patient-key "$key" --task readmission_30d --as-of "$as_of" --role clinician
  dl pretrain --images --epochs 10   # the CNN trunk, contrastive (SimCLR) on every image, labels unused
  # the CNN from random weights and fine-tuned from the trunk, on a tenth of the labels and on all
  # (two points of the label-efficiency curve in the report; bench/ssl_curves.py draws it whole)
  dl train --task breastmnist_normal --algorithms cnn,cnn_pretrained --epochs 15 --label-fraction 0.1
  dl train --task breastmnist_normal --algorithms cnn,cnn_pretrained --epochs 15
  dl score-images --model breastmnist_normal.cnn --source-system pacs
else
  echo; echo "(deep-learning steps skipped: make dl-env builds their runtime)"
fi
# a clinician decides the top open case (ehrlake review decide; train --with-feedback learns from it)
case=$("$bin/ehrlake" review list --task mortality_12m --limit 1 --json --role clinician --lake "$lake" \
  | "$bin/python" -c 'import json, sys; line = sys.stdin.readline(); print(json.loads(line)["case_id"] if line else "")')
if [ -n "$case" ]; then
  run review decide --case "${case:0:12}" --accept --reason "demo: the reasons match the record" --role clinician
fi
run pipeline conf/pipelines/report.yaml

cat <<EOT

Done. The Delta tables are under $lake/<layer>/<table> (bronze = typed records with lineage,
names, identifiers and the records as sent sealed to the reveal key (ek2:..., ek2z:...), the
records without identifiers for jobs (raw_deid) under a data key (ek1z:...), a pseudonymous
patient_key; ops.quarantine = every record that could not be loaded, with its reason;
silver = the common clinical model of docs/data_model.md, with ANN estimates of missing labs kept
apart in silver.observation_estimates (docs/record_update.md);
gold = data-quality results, readiness scorecard, suppressed EDA aggregates, features, labels,
the model registry and evaluation tables (docs/features.md), a care programme's progress
hierarchy and each patient's area for improvement (docs/hierarchy.md), image findings of the CNN
(docs/deep_learning.md), explained decisions (gold.decision_support, docs/self_supervised.md);
the HTML report
is $lake/report.html, the results as FHIR R4 resources (RiskAssessment, Observation, MeasureReport)
are in gen/fhir_export and the analyst notebook notebooks/analyst.ipynb;
audit.events = who read or wrote what, hash-chained).
Look at them with:
  .venv/bin/ehrlake lake show --json --lake $lake
  .venv/bin/python -c "from ehrlake import lake; lake.open('$lake').read('bronze.fhir_condition', role='engineer').show(5)"
  .venv/bin/ehrlake reveal --table bronze.fhir_patient --patient-key KEY --purpose "..." --role clinician --lake $lake
  .venv/bin/ehrlake serve sql --role analyst --lake $lake   # notebooks (Spark Connect) and BI tools (JDBC)
  .venv/bin/python -c "import deltalake; print(deltalake.DeltaTable('$lake/bronze/fhir_patient').to_pandas().head())"
EOT
