"""A role's view of the lake in Spark's catalog: ``silver.condition`` as the policy shows the role.

Each table the role may read becomes a view under its own name holding exactly the columns the
policy shows that role (hidden and, by policy, sealed columns are not there) and, for a role
limited to some rows (a site's own), only those rows; a table the limit cannot apply to gets no
view. The view reads the Delta table registered under a database name made up here
(``_ehrlake_<hex>``), which the guard never lets a statement name. ``ehrlake sql`` keeps the views
for one statement; ``ehrlake serve sql`` for the server's life, adding tables as jobs create them.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid

from pyspark.errors import AnalysisException

from ehrlake.errors import EnvironmentProblem
from ehrlake.lake.catalog import TableName, list_tables


class RoleViews:
    """The views of ``role`` (an :class:`~ehrlake.security.access.Role`) over ``lake``, made in its
    Spark session's catalog; :meth:`close` takes them away again."""

    def __init__(self, lake, role):
        self.lake, self.role, self.spark = lake, role, lake.spark
        self.hidden = f"_ehrlake_{uuid.uuid4().hex}"
        self.columns: dict[str, list[str]] = {}  # each view: the columns the policy shows the role
        self._location = tempfile.mkdtemp(prefix="ehrlake-sql-")
        self._databases: list[str] = []
        self._catalog = self.spark._jsparkSession.sessionState().catalog()  # what is registered

    @property
    def views(self) -> list[str]:
        """The views made so far, by name (``layer.table``)."""
        return list(self.columns)

    def add(self, names) -> list[str]:
        """Views for these tables (``layer.table``, each one the role may read); the new ones."""
        added = []
        for name in names:
            if name in self.columns:
                continue
            table = TableName.parse(name)
            if not self._databases:
                self._database(self.hidden)
            if table.layer not in self._databases:
                if self._catalog.databaseExists(table.layer):
                    raise EnvironmentProblem(
                        f"the session's catalog has a database {table.layer} of its own (a shared "
                        "metastore?), whose tables would be read past the access policy: serve SQL "
                        "from a session on the embedded catalog"
                    )
                self._database(table.layer)
            stored = f"{self.hidden}.{table.layer}__{table.table}"
            self.spark.sql(f"CREATE TABLE {stored} USING delta LOCATION '{self.lake.path(name)}'")
            columns = self.lake.security.access.shown_columns(self.lake, name, self.role)
            listed = ", ".join(f"`{c}`" for c in columns)
            rows = f" WHERE {self.role.rows}" if self.role.rows else ""  # a site's own rows only
            try:
                self.spark.sql(f"CREATE VIEW {name} AS SELECT {listed} FROM {stored}{rows}")
            except AnalysisException:
                if not rows:
                    raise
                continue  # the role's row condition cannot apply to this table: no view of it
            self.columns[name] = columns
            added.append(name)
        return added

    def add_readable(self) -> list[str]:
        """Views for every table of the lake the role may read and that has none yet."""
        return self.add([str(t) for t in list_tables(self.lake.root) if self.role.may_read(str(t))])

    def close(self) -> None:
        """Drop the views and their databases (the tables' data stays: they are registered, not owned)."""
        for database in reversed(self._databases):
            self.spark.sql(f"DROP DATABASE IF EXISTS {database} CASCADE")
        self._databases.clear()
        self.columns.clear()
        shutil.rmtree(self._location, ignore_errors=True)

    def _database(self, name: str) -> None:
        self.spark.sql(f"CREATE DATABASE {name} LOCATION '{self._location}/{name}'")
        self._databases.append(name)

    def __enter__(self) -> RoleViews:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
