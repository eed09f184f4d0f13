#!/usr/bin/env bash
# The Delta Lake JARs for the native engine, once: Maven resolves delta-spark and what it needs into
# .jars/delta; a JAR Spark already ships (same artifact, e.g. Jackson, Hadoop, Parquet) is dropped, so
# Spark's own copy is the one loaded. Without Maven, or offline, the lake uses the delta-rs engine.
set -euo pipefail
out="${1:-.jars/delta}"
spark_jars="$2"  # pyspark/jars of the runtime
if ! command -v mvn >/dev/null 2>&1; then
  echo "Maven (mvn) not found: the native Delta engine is off, the delta-rs engine writes the lake"
  exit 0
fi
tmp="$out.tmp"
rm -rf "$tmp" && mkdir -p "$tmp"
if ! mvn -q -B -Dstyle.color=never -f infra/delta/pom.xml dependency:copy-dependencies \
    -DoutputDirectory="$(realpath -m "$tmp")" -DincludeScope=runtime 2>&1 | sed "s/\x1b\[[0-9;]*m//g"; then
  rm -rf "$tmp"
  echo "could not fetch the Delta Lake JARs (above): the native engine is off, delta-rs writes the lake"
  exit 0
fi
for jar in "$tmp"/*.jar; do
  artifact="$(basename "$jar" | sed -E 's/-[0-9][^-]*(-[A-Za-z0-9.]+)*\.jar$//')"
  if ls "$spark_jars/$artifact"-[0-9]*.jar >/dev/null 2>&1; then rm "$jar"; fi
done
# ehrlake's own Spark classes (infra/spark): the lake catalog (tables known by name), the SQL server's
# policy guard (every analysed statement checked against the role's views), its token login (JDBC) and
# the column sealer (sealing and patient keys in the JVM, with the zstd dictionary Python seals with)
if command -v javac >/dev/null 2>&1; then
  classes="$tmp/classes" && mkdir -p "$classes"
  javac -nowarn -source 17 -target 17 -d "$classes" -cp "$spark_jars/*:$tmp/*" infra/spark/src/ehrlake/*.java
  cp lib/ehrlake/security/seal-v1.zdict "$classes/ehrlake/"
  jar cf "$tmp/ehrlake-spark.jar" -C "$classes" . && rm -rf "$classes"
else
  echo "no Java compiler (javac): tables are not known by name in SQL and there is no SQL server (install a JDK, e.g. openjdk-17-jdk-headless)"
fi
rm -rf "$out" && mv "$tmp" "$out"
echo "Delta Lake JARs in $out: $(ls "$out" | tr '\n' ' ')"
