#!/usr/bin/env bash
# A screenshot of the HTML report as a browser renders it (headless Chromium; apt-get install chromium),
# for docs/: bash scripts/report_screenshot.sh [LAKE] [OUT.png] [HEIGHT]
set -euo pipefail
lake="${1:-./lake}"
out="${2:-docs/report.png}"
height="${3:-3200}"
report="$(realpath "$lake")/report.html"
[ -f "$report" ] || { echo "no $report: run make demo (or ehrlake report) first" >&2; exit 1; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "no Chromium found: apt-get install chromium" >&2; exit 1; }
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --window-size="1280,$height" --screenshot="$(realpath -m "$out")" "file://$report" 2>/dev/null
echo "wrote $out (the first $height pixels of $report)"
