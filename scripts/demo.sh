#!/usr/bin/env bash
# The pipeline that exists so far, end to end, on the bundled sample data and the embedded default
# (local[*], lake under ./lake). Re-running it is safe: ingest skips files it has already loaded.
set -euo pipefail
lake="${1:-./lake}"
bin="$(dirname "$0")/../.venv/bin"
run() { echo; echo "\$ ehrlake $*"; "$bin/ehrlake" "$@" --lake "$lake"; }

run ingest --source fhir-bundles --input data/sample/fhir_bundles
run ingest --source fhir-ndjson --input data/sample/fhir_ndjson
run ingest --source synthea-csv --input data/sample/synthea_csv
run lake show

cat <<EOT

Done. The Delta tables are under $lake/<layer>/<table> (bronze = typed records with lineage,
ops.quarantine = every record that could not be loaded, with its reason).
Look at them with:
  .venv/bin/ehrlake lake show --json --lake $lake
  .venv/bin/python -c "from ehrlake import lake; lake.open('$lake').read('bronze.fhir_patient').show(5)"
  .venv/bin/python -c "import deltalake; print(deltalake.DeltaTable('$lake/bronze/fhir_patient').to_pandas().head())"
EOT
