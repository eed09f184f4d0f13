#!/usr/bin/env bash
# Start a local Spark standalone cluster (one master, N workers) from the pip-installed pyspark,
# bound to 127.0.0.1. Usage: infra/standalone/start.sh [WORKERS] ; prints the master URL.
# Environment: PYTHON (default: python3 on PATH), SPARK_MASTER_PORT (7077), SPARK_MASTER_WEBUI_PORT (8080),
# SPARK_WORKER_CORES (1), SPARK_WORKER_MEMORY (2g), EHRLAKE_CLUSTER_DIR (./.cluster: logs, pids, work dirs).
set -euo pipefail
workers="${1:-2}"
python="${PYTHON:-python3}"
port="${SPARK_MASTER_PORT:-7077}"
webui="${SPARK_MASTER_WEBUI_PORT:-8080}"
dir="${EHRLAKE_CLUSTER_DIR:-$PWD/.cluster}"
spark_home="$("$python" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
export SPARK_HOME="$spark_home" SPARK_LOCAL_IP=127.0.0.1 SPARK_LOG_DIR="$dir/logs"
mkdir -p "$dir/logs" "$dir/pids"
master="spark://127.0.0.1:$port"

nohup "$spark_home/bin/spark-class" org.apache.spark.deploy.master.Master \
  --host 127.0.0.1 --port "$port" --webui-port "$webui" >"$dir/logs/master.out" 2>&1 &
echo $! >"$dir/pids/master.pid"

for i in $(seq 1 "$workers"); do
  mkdir -p "$dir/work-$i"
  nohup "$spark_home/bin/spark-class" org.apache.spark.deploy.worker.Worker "$master" \
    --host 127.0.0.1 --webui-port 0 --cores "${SPARK_WORKER_CORES:-1}" --memory "${SPARK_WORKER_MEMORY:-2g}" \
    --work-dir "$dir/work-$i" >"$dir/logs/worker-$i.out" 2>&1 &
  echo $! >"$dir/pids/worker-$i.pid"
done

# Wait until every worker has registered with the master (its JSON status page lists them).
for _ in $(seq 1 120); do
  alive=$("$python" - "$webui" <<'PY' 2>/dev/null || echo 0
import json, sys, urllib.request
print(json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/json/", timeout=2)).get("aliveworkers", 0))
PY
)
  if [ "$alive" -ge "$workers" ]; then
    echo "$master"
    exit 0
  fi
  sleep 1
done
echo "standalone cluster did not come up with $workers workers; see $dir/logs" >&2
exit 1
