#!/usr/bin/env bash
# Stop the cluster started by start.sh (same EHRLAKE_CLUSTER_DIR).
set -uo pipefail
dir="${EHRLAKE_CLUSTER_DIR:-$PWD/.cluster}"
for pidfile in "$dir"/pids/*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  pkill -TERM -P "$pid" 2>/dev/null
  kill -TERM "$pid" 2>/dev/null
  rm -f "$pidfile"
done
echo "stopped cluster in $dir"
