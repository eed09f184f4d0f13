#!/usr/bin/env bash
# Builds the deep-learning runtime: a second virtualenv with TensorFlow, Petastorm and a patched
# Horovod (docs/deep_learning.md says why it is separate). Usage: scripts/dl_env.sh [VENV_DIR]
#
# Horovod 0.28.1 (its last release) does not compile against TensorFlow 2.21 as shipped: its XLA op
# (xla_mpi_ops.cc) includes headers that moved. The PyPI sdist builds once that file is dropped from
# the TensorFlow CMake target and TensorFlow's bundled highwayhash / farmhash headers are on the
# include path. The built wheel is kept in $EHRLAKE_WHEEL_CACHE (keyed by this recipe) so a second
# environment on the same machine does not compile it again.
set -euo pipefail
VENV=$(realpath -m "${1:-.venv-dl}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOROVOD=0.28.1
CACHE=${EHRLAKE_WHEEL_CACHE:-$HOME/.cache/ehrlake/wheels}
# the recipe's content, not where this clone lies: every clone on the machine shares one build
RECIPE_KEY=$(cat "$0" "$ROOT/requirements/dl.txt" | sha256sum | cut -c1-12)
WHEEL_DIR=$CACHE/horovod-$HOROVOD-$RECIPE_KEY

PYBIN=$(command -v python3.11 || command -v python3)
[ -x "$VENV/bin/python" ] || "$PYBIN" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q -r "$ROOT/requirements/dl.txt"
# tf-keras 2.21 declares a dependency on the full `tensorflow` wheel; tensorflow-cpu provides it.
"$PIP" install -q --no-deps tf-keras==2.21.0
"$PIP" install -q --no-deps -e "$ROOT"

if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
  echo "building horovod $HOROVOD from its sdist (about 8 minutes on 2 cores)"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  "$PIP" download -q --no-deps --no-binary :all: "horovod==$HOROVOD" -d "$BUILD"
  tar -xzf "$BUILD/horovod-$HOROVOD.tar.gz" -C "$BUILD"
  SRC=$BUILD/horovod-$HOROVOD
  sed -i '/xla_mpi_ops.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
  TF_INC=$("$VENV/bin/python" -c 'import tensorflow as tf; print(tf.sysconfig.get_include())' 2>/dev/null)
  mkdir -p "$WHEEL_DIR"
  # the build imports TensorFlow many times, each printing its start-up notices: kept in a log,
  # shown when the build fails
  (cd "$SRC" && \
    CPLUS_INCLUDE_PATH="$TF_INC/external/highwayhash:$TF_INC/external/farmhash_archive/src" \
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j2 \
    "$PIP" wheel -q --no-deps --no-build-isolation . -w "$WHEEL_DIR") > "$BUILD/build.log" 2>&1 || {
    tail -n 60 "$BUILD/build.log"; echo "horovod $HOROVOD did not build (its log's end above)"; exit 1; }
fi
# --no-deps: horovod[spark] would pin pyarrow < 11; its runtime needs are in requirements/dl.txt
"$PIP" install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
check=$(TF_USE_LEGACY_KERAS=1 "$VENV/bin/horovodrun" --check-build 2>&1) || { echo "$check"; exit 1; }
if ! grep -q "\[X\] TensorFlow" <<<"$check" || ! grep -q "\[X\] Gloo" <<<"$check"; then
  echo "$check"; echo "horovod $HOROVOD was built without TensorFlow or Gloo"; exit 1
fi
echo "deep-learning runtime in $VENV: TensorFlow, Petastorm, Horovod $HOROVOD with Gloo"
