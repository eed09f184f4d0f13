"""Units of common labs and vitals converted to one UCUM unit each, and the plausible range of each.

A conversion is declared by the silver unit a concept is stored in, the spellings of units seen in
sources, and how to convert a value from each. Concepts are identified by LOINC code. A value in a
unit not listed is kept as recorded (value and unit), never guessed; a value outside its plausible
range is flagged ``implausible_value``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyspark.sql import Column
from pyspark.sql import functions as F


@dataclass(frozen=True)
class Measure:
    name: str
    loinc: tuple[str, ...]
    unit: str  # UCUM
    conversions: dict[str, Callable[[Column], Column]]  # lower-cased source unit -> value in `unit`
    plausible: tuple[float, float]


def same(v: Column) -> Column:
    return v


def scale(factor: float) -> Callable[[Column], Column]:
    return lambda v: v * factor


def fahrenheit(v: Column) -> Column:
    return (v - 32) * 5 / 9


LB, INCH = scale(0.45359237), scale(2.54)
MEASURES: tuple[Measure, ...] = (
    Measure("body weight", ("29463-7", "3141-9"), "kg",
            {"kg": same, "[lb_av]": LB, "lb": LB, "lbs": LB, "g": scale(0.001)}, (0.2, 400)),
    Measure("body height", ("8302-2", "8306-3"), "cm",
            {"cm": same, "m": scale(100), "[in_i]": INCH, "in": INCH, "inch": INCH}, (20, 260)),
    Measure("body mass index", ("39156-5",), "kg/m2", {"kg/m2": same, "kg/m^2": same}, (8, 100)),
    Measure("body temperature", ("8310-5", "8331-1"), "Cel",
            {"cel": same, "°c": same, "degc": same, "c": same,
             "[degf]": fahrenheit, "°f": fahrenheit, "degf": fahrenheit, "f": fahrenheit}, (25, 45)),
    Measure("heart rate", ("8867-4",), "/min",
            {"/min": same, "beats/min": same, "bpm": same, "{beats}/min": same}, (20, 300)),
    Measure("respiratory rate", ("9279-1",), "/min",
            {"/min": same, "breaths/min": same, "{breaths}/min": same}, (3, 80)),
    Measure("systolic blood pressure", ("8480-6",), "mm[Hg]", {"mm[hg]": same, "mmhg": same}, (40, 300)),
    Measure("diastolic blood pressure", ("8462-4",), "mm[Hg]", {"mm[hg]": same, "mmhg": same}, (20, 200)),
    Measure("oxygen saturation", ("59408-5", "2708-6"), "%", {"%": same}, (40, 100)),
    Measure("glucose", ("2339-0", "2345-7"), "mg/dL", {"mg/dl": same, "mmol/l": scale(18.0156)}, (10, 2000)),
    Measure("haemoglobin A1c", ("4548-4", "17856-6"), "%", {"%": same}, (2, 25)),
    Measure("total cholesterol", ("2093-3",), "mg/dL", {"mg/dl": same, "mmol/l": scale(38.67)}, (30, 1000)),
    Measure("creatinine", ("2160-0", "38483-4"), "mg/dL",
            {"mg/dl": same, "umol/l": scale(1 / 88.42), "µmol/l": scale(1 / 88.42)}, (0.05, 30)),
)  # fmt: skip


def normalise(code: Column, value: Column, unit: Column) -> tuple[Column, Column, Column]:
    """(value in the silver unit, silver unit, implausible?) for one observation's LOINC code."""
    u = F.lower(F.trim(unit))
    converted, silver_unit, implausible = value, unit, F.lit(False)
    for measure in MEASURES:
        is_measure = code.isin(*measure.loinc)
        known = F.lit(False)
        result = F.lit(None).cast("double")
        for spelling, convert_from in measure.conversions.items():
            hit = u == F.lit(spelling)
            known = known | hit
            result = F.when(hit, convert_from(value.cast("double"))).otherwise(result)
        convert = is_measure & known
        converted = F.when(convert, result).otherwise(converted)
        silver_unit = F.when(convert, F.lit(measure.unit)).otherwise(silver_unit)
        low, high = measure.plausible
        implausible = F.when(convert, (result < low) | (result > high)).otherwise(implausible)
    return converted, silver_unit, F.coalesce(implausible, F.lit(False))
