"""ehrlake: an EHR lakehouse on Apache Spark and Delta Lake."""

from setuptools import find_packages, setup

# Pinned to versions that install together on Python 3.11 (checked with `pip index versions`).
# pyspark 4.2 needs pyarrow >= 18 for its Arrow paths; it is 4.2, not 4.3, because Delta Lake 4.4 (the
# native engine) is built for Spark 4.2. deltalake 1.6 is the delta-rs commit engine.
INSTALL_REQUIRES = [
    "pyspark==4.2.0",
    "delta-spark==4.4.0",  # the native engine's Python API; its JARs: make setup (scripts/delta_jars.sh)
    "deltalake==1.6.6",
    "pyarrow==22.0.0",
    "pandas==2.3.3",
    "numpy==2.3.5",
    "cryptography==50.0.2",
    "xgboost==3.2.0",
    "scikit-learn==1.8.0",
    "scipy==1.17.1",  # linear programming audit of small-cell suppression
    "pulp==3.3.2",  # the resource allocation program (ehrlake plan), solved by its bundled CBC
    "philter-ucsf==1.0.3",  # its name lists (BSD-3, data only): names no context marks, in notes
    "pyyaml==6.0.3",
    # zstd with a trained dictionary compresses each raw record ~5x before it is sealed (docs/security.md)
    "zstandard==0.25.0",
    "matplotlib==3.11.2",  # plots of the HTML report
    "pydicom==3.0.2",  # DICOM images into bronze.images (uncompressed transfer syntaxes need no codec)
    "pillow==13.0.0",  # PNG decoding and resampling of image pixels
    # PySpark's Spark Connect client (pyspark[connect]): notebooks on `ehrlake serve sql`
    "grpcio==1.85.3",
    "grpcio-status==1.85.3",
    "googleapis-common-protos==1.76.0",
    # federated learning across sites (ehrlake federated; docs/federated.md): Flower's SuperLink,
    # SuperNodes and apps, and the privacy accountant (epsilon of the noise a run added)
    "flwr==1.42.0",  # needs cryptography >= 50 (hence the pin above)
    "dp-accounting==0.6.0",
]

EXTRAS_REQUIRE = {
    # nbclient + ipykernel execute the notebooks headless in the tests
    # fhir.resources validates every exported resource against the R4(B) models
    "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "ruff==0.17.6", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
             "fhir.resources==8.3.0"],
    # TensorFlow installs beside the base pins (checked with pip --dry-run), enough for the Arrow-native
    # dataset backend. Petastorm 0.13.1 needs pyarrow < 15 and Horovod a patched build, which conflict
    # with pyspark 4.2's pyarrow >= 18, so those get their own runtime (issue 8), not an extra here.
    "dl": ["tensorflow-cpu==2.21.0"],
}

setup(
    name="ehrlake",
    version="0.1.0",
    description="EHR lakehouse on Apache Spark: ingest, clean, analyse and model health records in Delta tables",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    package_data={"ehrlake.security": ["*.zdict"], "ehrlake.federated": ["app/*.toml", "app/ehrlake_fl/*.py"]},
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["ehrlake = ehrlake.cli:console"]},
)
