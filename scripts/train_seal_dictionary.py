"""Train the zstd dictionary that compresses raw records before they are sealed.

Sealed values cannot be compressed by Parquet afterwards (ciphertext is random), so each raw record
is compressed first, on its own. Records are short (a few hundred bytes to a few KB) and share most
of their structure (FHIR keys, code-system URLs, CSV layouts), which a trained dictionary captures:
~5x per record instead of ~1.9x without one. The dictionary is trained on the bundled *synthetic*
sample only (Synthea), so it holds no real person's data; it ships with the code and its version is
part of the ciphertext prefix (``ek1z``), so changing it means a new prefix, never a silent swap.

    .venv/bin/python scripts/train_seal_dictionary.py   # rewrites lib/ehrlake/security/seal-v1.zdict
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
OUT = REPO / "lib" / "ehrlake" / "security" / "seal-v1.zdict"
SIZE = 16 * 1024
PER_KIND = 4000


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        yield from (line.rstrip("\r\n") for line in fh if line.strip())


def samples(rng: random.Random) -> list[bytes]:
    fhir = [line for p in sorted((SAMPLE / "fhir_ndjson").rglob("*.ndjson*")) for line in _lines(p)]
    for path in sorted((SAMPLE / "fhir_bundles").rglob("*.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            fhir += [json.dumps(e["resource"], separators=(",", ":")) for e in json.load(fh).get("entry", [])]
    csv_files = sorted((SAMPLE / "synthea_csv").rglob("*.csv*"))
    csv_rows = [line for p in csv_files for line in list(_lines(p))[1:]]  # without headers
    picked = rng.sample(fhir, min(PER_KIND, len(fhir))) + rng.sample(csv_rows, min(PER_KIND, len(csv_rows)))
    return [s.encode() for s in picked]


def main() -> None:
    data = samples(random.Random(20261124))
    dictionary = zstandard.train_dictionary(SIZE, data, level=3)
    OUT.write_bytes(dictionary.as_bytes())
    compressor = zstandard.ZstdCompressor(level=1, dict_data=dictionary)
    ratio = sum(map(len, data)) / sum(len(compressor.compress(d)) for d in data)
    size = OUT.stat().st_size
    print(f"wrote {OUT.relative_to(REPO)} ({size} bytes) from {len(data)} records; ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
