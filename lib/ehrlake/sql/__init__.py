"""SQL over the lake for public-health analysts, the access policy enforced inside Spark.

- ``query``: one statement as a role (``ehrlake sql``);
- ``server``: a Spark Connect server of one role's views on 127.0.0.1 (``ehrlake serve sql``);
- ``views``: a role's views of the lake in Spark's catalog; ``guard``: the check of every plan.
"""

from ehrlake.sql.query import query
from ehrlake.sql.server import SqlServer

__all__ = ["query", "SqlServer"]
