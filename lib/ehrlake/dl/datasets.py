"""TensorFlow datasets from Delta tables: a snapshot's file list, a selection, shards per worker.

A training job never scans a table directory: it reads the data files of one Delta version (the
snapshot's ``add`` actions, so files of failed writers, removed files and uncommitted staging are
never seen) and records that version with the model. The rows it wants are a conjunction of
``(column, op, value)`` filters (pyarrow's form, also Petastorm's). Sharding is planned once, on the
driver: each worker gets whole files, balanced by the number of selected rows they hold, so no
worker reads another's rows and each worker's reader can stream its files independently.

Two readers behind one function (:func:`open_dataset`):

* ``petastorm``: ``make_batch_reader`` over the shard's files (thread pool, row groups shuffled per
  epoch) and ``make_petastorm_dataset``; needs the deep-learning runtime (pyarrow 14).
* ``arrow``: ``pyarrow.dataset`` record batches into ``tf.data.Dataset.from_generator``; works with
  any pyarrow and needs no Petastorm, so the jobs also run in the main environment.

Both yield the same elements: ``(x, y)`` where ``x`` is the ``tensor`` column (little-endian float32
bytes, as ``silver.imaging.pixels`` and ``gold.tensors_<task>.x`` store them) decoded to ``shape``
and ``y`` the label as float32.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ehrlake.errors import EhrlakeError

BACKENDS = ("petastorm", "arrow")


@dataclass(frozen=True)
class Snapshot:
    """The data files of one version of a Delta table."""

    table: str
    path: str
    version: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class Shard:
    """What one worker reads: whole files of a snapshot and how many selected rows they hold."""

    rank: int
    files: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class Selection:
    """Rows of a snapshot: ``filters`` (a conjunction) and the columns to decode."""

    filters: tuple[tuple[str, str, object], ...]
    tensor: str  # float32 bytes
    shape: tuple[int, ...]
    label: str = "label"


def snapshot(lake_root: str, table: str, version: int | None = None) -> Snapshot:
    """The files of ``table`` at ``version`` (default: latest), from the Delta log."""
    from deltalake import DeltaTable

    from ehrlake.lake.catalog import table_path

    path = table_path(lake_root, table)
    if not os.path.isdir(os.path.join(path, "_delta_log")):
        raise EhrlakeError(f"no Delta table {table} under {lake_root}")
    dt = DeltaTable(path, version=version)
    files = tuple(sorted(_local(u) for u in dt.file_uris()))
    return Snapshot(table, path, dt.version(), files)


def _local(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


# The filter operators; each works on a pyarrow field expression and on a pandas Series alike.
_OPS = {
    "=": operator.eq,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "in": lambda f, v: f.isin(list(v)),
}


def _conjunction(filters, column_of):
    """``filters`` and-ed over the columns ``column_of(name)`` gives."""
    combined = None
    for column, op, value in filters:
        if op not in _OPS:
            raise EhrlakeError(f"filter operator {op!r} not supported ({', '.join(_OPS)})")
        term = _OPS[op](column_of(column), value)
        combined = term if combined is None else combined & term
    return combined


def spark_condition(filters):
    """The same conjunction as a Spark condition: the rows of a frame the readers would select."""
    from pyspark.sql import functions as F

    return _conjunction(filters, F.col)


def _expression(filters):
    import pyarrow.dataset as ds

    return _conjunction(filters, ds.field)


def selected_rows(files: tuple[str, ...], filters) -> dict[str, int]:
    """Selected rows per file, reading only the filtered columns (and skipping row groups whose
    statistics exclude the filters)."""
    import pyarrow.dataset as ds

    expr = _expression(filters)
    return {f: ds.dataset(f, format="parquet").count_rows(filter=expr) for f in files}


def whole_shard(snap: Snapshot, selection: Selection) -> Shard | None:
    """Every file with selected rows as one shard (a split every rank reads whole); None: no rows."""
    counts = {f: n for f, n in selected_rows(snap.files, selection.filters).items() if n}
    return Shard(0, tuple(sorted(counts)), sum(counts.values())) if counts else None


def plan_shards(snap: Snapshot, selection: Selection, workers: int) -> list[Shard]:
    """Assign whole files to ``workers`` so their selected rows are as even as greedy allows.

    Raises when a worker would get nothing (fewer non-empty files than workers): that worker would
    wait forever for its first batch, so say so instead."""
    counts = {f: n for f, n in selected_rows(snap.files, selection.filters).items() if n > 0}
    if not counts:
        raise EhrlakeError(f"{snap.table} v{snap.version}: no rows match {list(selection.filters)}")
    if len(counts) < workers:
        raise EhrlakeError(
            f"{snap.table} v{snap.version}: the selection {list(selection.filters)} lies in "
            f"{len(counts)} data file(s), fewer than the {workers} workers asked for; use fewer "
            "workers or rewrite the table in smaller files (runtime.images_per_file, then ehrlake clean)"
        )
    loads = [0] * workers
    assigned: list[list[str]] = [[] for _ in range(workers)]
    for f, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        i = loads.index(min(loads))
        assigned[i].append(f)
        loads[i] += n
    return [Shard(i, tuple(sorted(assigned[i])), loads[i]) for i in range(workers)]


def default_backend() -> str:
    try:
        import petastorm  # noqa: F401
    except ImportError:
        return "arrow"
    return "petastorm"


@contextlib.contextmanager
def open_dataset(
    shard: Shard,
    selection: Selection,
    backend: str = "auto",
    batch_size: int = 32,
    repeat: bool = True,
    shuffle: int = 0,
    seed: int = 0,
) -> Iterator:
    """A ``tf.data.Dataset`` of ``(x, y)`` batches over the shard (closed on exit).

    ``repeat``: endless (training reads a fixed number of steps per epoch, the same on every
    worker, so no worker waits at an allreduce for one that ran out); ``shuffle``: buffer size."""
    from ehrlake.dl.runtime import tensorflow

    tf = tensorflow()
    backend = default_backend() if backend == "auto" else backend
    if backend not in BACKENDS:
        raise EhrlakeError(f"dataset backend {backend!r}: use one of {', '.join(BACKENDS)} or auto")
    columns = [selection.tensor, selection.label]
    with _records(shard, selection, backend, columns, repeat, seed) as records:

        def decode(x, y):
            return tf.reshape(tf.io.decode_raw(x, tf.float32), selection.shape), tf.cast(y, tf.float32)

        ds = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        if shuffle:
            ds = ds.shuffle(shuffle, seed=seed, reshuffle_each_iteration=True)
        yield ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


@contextlib.contextmanager
def _records(shard: Shard, selection: Selection, backend: str, columns, repeat: bool, seed: int):
    """Unbatched ``(tensor bytes, label)`` elements of the shard."""
    from ehrlake.dl.runtime import tensorflow

    tf = tensorflow()
    if backend == "petastorm":
        from petastorm import make_batch_reader
        from petastorm.tf_utils import make_petastorm_dataset

        # Petastorm's `filters` only prune partition directories; row filters are a predicate
        wanted = list(dict.fromkeys([*columns, *(c for c, _, _ in selection.filters)]))
        reader = make_batch_reader(
            [f"file://{f}" for f in shard.files],
            schema_fields=wanted,
            predicate=_predicate(selection.filters),
            num_epochs=None if repeat else 1,
            shuffle_row_groups=True,
            seed=seed,
            workers_count=2,
        )
        try:
            batches = make_petastorm_dataset(reader)
            yield batches.map(lambda b: (getattr(b, columns[0]), getattr(b, columns[1]))).unbatch()
        finally:
            reader.stop()
            reader.join()
        return

    import pyarrow.dataset as pads

    expr = _expression(selection.filters)
    files = list(shard.files)

    def generate():
        rng_epoch = 0
        while True:
            order = files if not seed else _shuffled(files, seed + rng_epoch)
            for batch in pads.dataset(order, format="parquet").to_batches(
                columns=columns, filter=expr, batch_size=1024
            ):
                yield (
                    batch.column(0).to_numpy(zero_copy_only=False),
                    batch.column(1).to_numpy(zero_copy_only=False).astype("int32"),
                )
            rng_epoch += 1
            if not repeat:
                return

    yield tf.data.Dataset.from_generator(
        generate,
        output_signature=(tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)),
    ).unbatch()


def _predicate(filters):
    """Petastorm predicate evaluating ``filters`` vectorised on the predicate columns."""
    from petastorm.predicates import PredicateBase

    class Filters(PredicateBase):
        def get_fields(self):
            return {c for c, _, _ in filters}

        def do_include(self, values):
            return _conjunction(filters, lambda c: values[c]).fillna(False).astype(bool)

    return Filters()


def _shuffled(items: list[str], seed: int) -> list[str]:
    import random

    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def read_all(snap: Snapshot, selection: Selection, columns: list[str], batch_size: int = 1024) -> Iterator:
    """Selected rows of the whole snapshot as pyarrow record batches of ``columns`` (prediction and
    evaluation stream them; nothing holds the table in memory)."""
    import pyarrow.dataset as pads

    yield from pads.dataset(list(snap.files), format="parquet").to_batches(
        columns=columns, filter=_expression(selection.filters), batch_size=batch_size
    )
