"""Deterministic ids and draws for generated patients: the same seed and inputs give the same values."""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

BAD_DATE = "2021-13-45"  # the "impossible date" fault


def uuid(*parts: Column | str) -> Column:
    """A deterministic UUID-shaped id from the parts (MD5; an id, not a secret)."""
    h = F.md5(F.concat_ws("|", *[F.lit(p) if isinstance(p, str | int) else p for p in parts]))
    return F.lower(
        F.concat_ws("-", h.substr(1, 8), h.substr(9, 4), h.substr(13, 4), h.substr(17, 4), h.substr(21, 12))
    )


def unit(seed: int, salt: str, *cols: Column) -> Column:
    """A uniform number in [0, 1) from a hash of the columns (deterministic per seed and salt)."""
    return F.pmod(F.xxhash64(F.lit(seed), F.lit(salt), *cols), F.lit(1_000_000)) / 1_000_000.0
