"""Logical table names (``bronze.fhir_patient``) and where they live under the lake root.

A name is ``<layer>.<table>``; its Delta table sits at ``<root>/<layer>/<table>``. Layers are a
fixed, small set so that access policy and ``lake show`` can reason about them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ehrlake.errors import ConfigError

LAYERS = ("bronze", "silver", "gold", "ops", "audit")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True, order=True)
class TableName:
    layer: str
    table: str

    @classmethod
    def parse(cls, name: str | TableName) -> TableName:
        if isinstance(name, TableName):
            return name
        layer, dot, table = str(name).partition(".")
        if not dot or layer not in LAYERS or not _NAME.match(table):
            raise ConfigError(
                f"table name {name!r} must be <layer>.<table> with layer one of {', '.join(LAYERS)} "
                "and a lower-case table name"
            )
        return cls(layer, table)

    def __str__(self) -> str:
        return f"{self.layer}.{self.table}"


def table_path(root: str, name: str | TableName) -> str:
    """Directory of the Delta table for a logical name."""
    name = TableName.parse(name)
    return os.path.join(root, name.layer, name.table)


def list_tables(root: str) -> list[TableName]:
    """Every Delta table under the lake root, in name order (a table is a dir with ``_delta_log``)."""
    found = []
    for layer in LAYERS:
        layer_dir = os.path.join(root, layer)
        if not os.path.isdir(layer_dir):
            continue
        for entry in sorted(os.listdir(layer_dir)):
            if os.path.isdir(os.path.join(layer_dir, entry, "_delta_log")) and _NAME.match(entry):
                found.append(TableName(layer, entry))
    return found


def bronze_patient_tables(root: str) -> list[str]:
    """The bronze tables of patient records: FHIR's ``bronze.fhir_patient`` and each extract's or
    Synthea's ``bronze.<...>patients``, in name order."""
    return [
        str(n)
        for n in list_tables(root)
        if n.layer == "bronze" and (n.table.endswith("patients") or str(n) == "bronze.fhir_patient")
    ]
