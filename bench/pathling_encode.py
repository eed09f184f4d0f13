"""Pathling's own flattening of FHIR NDJSON (its encoders: every element of the FHIR R4 schema), for
bench/views.py to compare with. Runs in Pathling's environment (``make pathling-env`` ->
``.venv-pathling``: Pathling 6.3.1 on Spark 3.3, which ships its JARs and needs no download), not in
ehrlake's: it imports nothing from ehrlake.

    .venv-pathling/bin/python bench/pathling_encode.py NDJSON_DIR OUT_DIR   # prints one JSON line
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> int:
    ndjson, out = Path(sys.argv[1]), Path(sys.argv[2])
    from pathling import PathlingContext
    from pathling.etc import find_jar
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[*]")
        .config("spark.jars", find_jar())  # the bundled runtime: nothing to download
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    pc = PathlingContext.create(spark)
    spark.range(1000).selectExpr("sum(id)").collect()
    start = time.perf_counter()
    source = pc.read.ndjson(str(ndjson))
    source.write.parquet(str(out))
    seconds = time.perf_counter() - start
    rows = {
        p.name.split(".")[0]: spark.read.parquet(str(p)).count() for p in sorted(out.iterdir()) if p.is_dir()
    }
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"seconds": round(seconds, 1), "rows": rows, "bytes": size, "spark": spark.version}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
