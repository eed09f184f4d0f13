"""What the point-in-time features are made of: windows, condition groups and labs, from
``conf/features.yaml`` (declared, so a clinician can review and extend them without reading Spark)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column
from pyspark.sql import functions as F

from ehrlake.config import build, read_yaml
from ehrlake.errors import ConfigError
from ehrlake.home import CONF

FEATURES_FILE = CONF / "features.yaml"
PREFIX_SYSTEMS = ("ICD9CM", "ICD10CM", "ICD10")  # matched by prefix of the dotted code
EXACT_SYSTEMS = ("SNOMED", "LOINC")


@dataclass(frozen=True)
class CodeSet:
    """A named set of codes across systems (exact for SNOMED / LOINC, prefixes for ICD)."""

    name: str
    description: str
    codes: dict[str, tuple[str, ...]]  # system -> codes or prefixes
    estimates: bool = False  # a lab only: a row without a measurement takes the record update's estimate
    stale_days: int | None = None  # a lab only: older than this the record update estimates it anew

    def matches(self, system: Column, code: Column) -> Column:
        terms = []
        for sys_name, values in self.codes.items():
            if sys_name in PREFIX_SYSTEMS:
                hit = None
                for prefix in values:
                    one = code.startswith(prefix)
                    hit = one if hit is None else hit | one
            else:
                hit = code.isin(*values)
            terms.append((system == sys_name) & hit)
        out = F.lit(False)
        for term in terms:
            out = out | term
        return out


@dataclass(frozen=True)
class Windows:
    recent_days: int = 365
    long_days: int = 1825
    labs_days: int = 730
    observed_days: int = 730
    labs_stale_days: int = 365  # the record update: a lab value older than this is estimated anew

    def validate(self) -> None:
        for name, days in vars(self).items():
            if days < 1:
                raise ConfigError(f"windows.{name} must be a positive number of days, not {days}")


@dataclass(frozen=True)
class _CodeSetSpec:
    """A code set as written in the file (one list per code system)."""

    description: str | None = None
    estimates: bool = False
    stale_days: int | None = None
    SNOMED: tuple = ()
    LOINC: tuple = ()
    ICD9CM: tuple = ()
    ICD10CM: tuple = ()
    ICD10: tuple = ()


@dataclass(frozen=True)
class Definitions:
    windows: Windows
    condition_groups: dict[str, CodeSet]
    labs: dict[str, CodeSet]
    # optional: per condition group, the notes of the long window that mention it (silver.note_concept)
    note_features: bool = False

    def stale_days(self, lab: str) -> int:
        """How old a lab's latest value may be and still count as today's (the record update)."""
        return self.labs[lab].stale_days or self.windows.labs_stale_days

    def group(self, name: str) -> CodeSet:
        if name not in self.condition_groups:
            raise ConfigError(f"no condition group {name!r} in conf/features.yaml")
        return self.condition_groups[name]


def _code_sets(data: dict, where: str) -> dict[str, CodeSet]:
    if not isinstance(data or {}, dict):
        raise ConfigError(f"{where} must be a mapping of named code sets")
    out = {}
    for name, spec in (data or {}).items():
        read = build(_CodeSetSpec, spec, f"{where}.{name}")
        systems = [
            key for key in spec if key not in ("description", "estimates", "stale_days")
        ]  # file's order
        codes = {s: tuple(str(c) for c in getattr(read, s)) for s in systems if getattr(read, s)}
        if not codes:
            raise ConfigError(f"{where}.{name} lists no codes")
        if read.estimates and where != "labs":
            raise ConfigError(f"{where}.{name}: only a lab can take estimates (estimates: true)")
        if read.stale_days is not None and (where != "labs" or read.stale_days < 1):  # an int (build)
            raise ConfigError(
                f"{where}.{name}: stale_days is a lab's positive number of days, not {read.stale_days!r}"
            )
        out[name] = CodeSet(name, read.description or name, codes, bool(read.estimates), read.stale_days)
    return out


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    return value


def load(path: str | Path | None = None) -> Definitions:
    path = Path(path or FEATURES_FILE)
    data = read_yaml(path)
    unknown = set(data) - {"windows", "condition_groups", "labs", "note_features"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}")
    defs = Definitions(
        build(Windows, data.get("windows"), "windows"),
        _code_sets(data.get("condition_groups"), "condition_groups"),
        _code_sets(data.get("labs"), "labs"),
        _flag(data.get("note_features", False), f"{path}: note_features"),
    )
    for lab in defs.labs.values():
        if (lab.stale_days or 0) > defs.windows.labs_days:  # the panel never holds a value that old
            raise ConfigError(
                f"labs.{lab.name}: stale_days {lab.stale_days} is past windows.labs_days "
                f"({defs.windows.labs_days}), so a value could never be stale"
            )
    return defs
