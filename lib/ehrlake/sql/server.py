"""``ehrlake serve sql``: Spark Connect and JDBC on 127.0.0.1, serving one role's views of the lake.

Analysts connect from a notebook or script with PySpark's own client::

    spark = SparkSession.builder.remote("sc://localhost:15002/;token=<the token file's text>").getOrCreate()
    spark.sql("SELECT code, count(*) FROM silver.condition GROUP BY code").toPandas()
    spark.table("gold.eda_demographics").where("state = 'Kerala'").show()

and BI tools and ``beeline`` through JDBC (Spark's Thrift server, Hive's JDBC driver), with any user
name and the token as password: ``jdbc:hive2://127.0.0.1:10000/default``.

Each client (connection) gets its own Spark session, in which the lake is the role's views only
(``views``): the tables the role may read, under their own names, with the columns the policy shows
it; other tables are absent. The guard (``guard``) refuses at analysis anything but reading those
views or data the client sent: reads by path, commands (DDL, writes, ``SET``), UDFs, reflection,
scripts. Every client operation is a ``sql`` event in ``audit.events`` with the role, the statement
(SQL text, or the plan a DataFrame sent), the views it read and the outcome: allowed, denied (by the
guard, or a lake table the role may not see) or error. Clients authenticate with a bearer token,
written (mode 0600) to a file only the server's user can read once both ports take connections (a
script may wait for the file); the server listens on 127.0.0.1 only.
Tables jobs create while it runs are added every ``refresh_seconds``.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import threading
import time
from pathlib import Path

from ehrlake.errors import EhrlakeError
from ehrlake.lake.catalog import list_tables
from ehrlake.security.audit import ALLOWED, DENIED, ERROR, Event
from ehrlake.sql import guard
from ehrlake.sql.views import RoleViews

_NOT_FOUND = re.compile(r"TABLE_OR_VIEW_NOT_FOUND\] The table or view `([a-z_]+)`\.`([a-z0-9_]+)`")


PORT_WAIT_SECONDS = 120


def _wait_for_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise EhrlakeError(
                    f"the SQL server's port {port} did not open within {seconds:.0f} s"
                ) from None
            time.sleep(0.2)


def new_token() -> str:
    """A session's secret: 256 bits as hex. Not URL-safe base64, whose tokens start with "-" one
    time in 64, and a command-line client reads such a password as an option (``beeline -p
    -hNS6...`` printed its usage and never connected)."""
    return secrets.token_hex(32)


class SqlServer:
    """One role's SQL endpoint over ``lake`` (whose session becomes the server's, trusted one)."""

    def __init__(
        self,
        lake,
        role: str,
        port: int = 15002,
        jdbc_port: int | None = 10000,
        token_file: str | None = None,
        refresh_seconds: float = 30,
    ):
        self.lake, self.port, self.jdbc_port, self.refresh_seconds = lake, port, jdbc_port, refresh_seconds
        self.role = lake.security.access.role(role, "serve sql")  # a granted role, or AccessDenied
        default_token = lake.security.protector.store.directory.parent / f"sql-server-{port}.token"
        self.token_file = Path(token_file or default_token)
        self.views = RoleViews(lake, self.role)
        self._stop = threading.Event()
        self._service = self._jdbc = None

    @property
    def url(self) -> str:
        """The address clients give ``SparkSession.builder.remote`` (plus ``;token=...``)."""
        return f"sc://localhost:{self.port}"

    @property
    def jdbc_url(self) -> str | None:
        """The JDBC address (Hive's driver; any user name, the token as password)."""
        return f"jdbc:hive2://127.0.0.1:{self.jdbc_port}/default" if self.jdbc_port else None

    def start(self) -> None:
        spark = self.lake.spark
        self.views.add_readable()
        guard.arm(spark, self.views.views)  # before the port opens: no client is ever unchecked
        guard.listen(spark)
        token = new_token()
        conf = spark.sparkContext._jsc.sc().conf()
        conf.set("spark.connect.grpc.binding.address", "127.0.0.1")
        conf.set("spark.connect.grpc.binding.port", str(self.port))
        conf.set("spark.connect.authenticate.token", token)
        self._service = spark._jvm.org.apache.spark.sql.connect.service.SparkConnectService
        self._service.start(spark.sparkContext._jsc.sc())
        if self.jdbc_port:
            spark._jvm.ehrlake.TokenAuthentication.expect(token)
            system = spark._jvm.java.lang.System
            for key, value in {
                "hive.server2.thrift.bind.host": "127.0.0.1",
                "hive.server2.thrift.port": str(self.jdbc_port),
                "hive.server2.authentication": "CUSTOM",  # the token as password (TokenAuthentication)
                "hive.server2.custom.authentication.class": "ehrlake.TokenAuthentication",
            }.items():
                spark.conf.set(key, value)
                system.setProperty(key, value)  # Hive reads its login class from a HiveConf of its own
            thrift = spark._jvm.org.apache.spark.sql.hive.thriftserver.HiveThriftServer2
            self._jdbc = thrift.startWithContext(spark._jsparkSession.sqlContext())
        # the token file is the sign that the server is ready: written once both ports take
        # connections (the Thrift server binds its port on a thread of its own, later)
        for port in (self.port, self.jdbc_port):
            if port:
                _wait_for_port(port, PORT_WAIT_SECONDS)
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token)

    def serve(self, seconds: float | None = None) -> None:
        """Write the guard's events to the audit log until :meth:`stop`, SIGTERM/SIGINT or ``seconds``."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        deadline = time.monotonic() + seconds if seconds else None
        refreshed = time.monotonic()
        while not self._stop.wait(0.5):
            self.record()
            if time.monotonic() - refreshed > self.refresh_seconds:
                if self.views.add_readable():
                    guard.arm(self.lake.spark, self.views.views)
                refreshed = time.monotonic()
            if deadline and time.monotonic() > deadline:
                break
        self.close()

    def record(self) -> int:
        """The guard's events since the last call into ``audit.events``, in one commit."""
        events = [self._event(e) for e in guard.drain(self.lake.spark)]
        if events:
            self.lake.security.audit.record(*events)
        return len(events)

    def _event(self, e: guard.GuardEvent) -> Event:
        outcome, reason = {"allowed": ALLOWED, "denied": DENIED}.get(e.outcome, ERROR), e.reason
        missing = _NOT_FOUND.search(e.reason or "")
        if missing and f"{missing[1]}.{missing[2]}" in {str(t) for t in list_tables(self.lake.root)}:
            # absent from the role's views, not from the lake: a table the role may not read
            outcome, reason = DENIED, f"{missing[1]}.{missing[2]} may not be read by role {self.role.name}"
        detail = e.statement if outcome == ALLOWED else f"{e.statement}\n-- {e.outcome}: {reason}"
        return Event(
            "sql",
            outcome=outcome,
            role=self.role.name,
            job=f"sql-server:{self.port}",
            table_name=",".join(e.views) or None,
            detail=detail[:4000],
        )

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._jdbc is not None:
            jdbc, self._jdbc = self._jdbc, None
            jdbc.stop()
        if self._service is not None:
            service, self._service = self._service, None
            service.stop(getattr(service, "stop$default$1")(), getattr(service, "stop$default$2")())
        self.record()
        guard.disarm(self.lake.spark)
        self.views.close()
        self.token_file.unlink(missing_ok=True)
