"""ehrlake: an EHR lakehouse on Apache Spark.

Analysts start with::

    from ehrlake import lake
    lk = lake.open("./lake")          # builds or reuses a SparkSession
    lk.read("bronze.fhir_patient").show()

Submodules are imported lazily so that ``import ehrlake`` stays fast and works without Spark started.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["lake", "ingest", "config", "session"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"ehrlake.{name}")
    raise AttributeError(f"module 'ehrlake' has no attribute {name!r}")
