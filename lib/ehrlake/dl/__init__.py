"""Deep learning on the lake: TensorFlow datasets from Delta snapshots (Petastorm or Arrow),
distributed training (Horovod on Spark, or MultiWorkerMirroredStrategy in a barrier stage), a CNN per
image task and an ANN per tabular task, Grad-CAM, and predictions written back to Delta.

::

    ehrlake train --task breastmnist_normal                 # CNN -> gold.image_findings
    ehrlake train --task diabetes130_readmission_30d --algorithms ann
    ehrlake evaluate --model breastmnist_normal.cnn --input new_images.npz
    ehrlake score-images --model breastmnist_normal.cnn --source-system pacs

Why the jobs have a runtime of their own (``make dl-env``): docs/deep_learning.md.
"""

import logging
import os

# Before anything imports TensorFlow (Horovod and Petastorm do at import): the legacy tf-keras,
# which Horovod's optimizer wrapper and MultiWorkerMirroredStrategy need (runtime.py).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's start-up notices (oneDNN, CPU instructions, absl) are printed by its C++ code before
# any log level applies; they are filtered from this process's stderr while TF is first imported
# (before Horovod or Petastorm can import it unfiltered). Anything else it prints still shows;
# EHRLAKE_DEBUG (--verbose) shows everything. Turning oneDNN off would silence it too, but changes
# numerics and speed, so it stays on.
_NOTICES = (
    "oneDNN custom operations are on",
    "All log messages before absl::InitializeLog",
    "cpu_feature_guard",
    "To enable the following instructions",
)


def _import_tensorflow_quietly() -> None:
    import importlib.util
    import sys
    import tempfile

    if os.environ.get("EHRLAKE_DEBUG") or importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            pass  # runtime.tensorflow() says what to install
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not any(notice in line for notice in _NOTICES):
                    print(line, file=sys.stderr)


_import_tensorflow_quietly()

# Petastorm 0.12 calls pyarrow APIs deprecated since pyarrow 2 (kept at 14 for it): every reader in
# every Horovod worker repeated ~20 FutureWarnings (2,000 of the demo's 2,600 log lines). Known and
# harmless here; EHRLAKE_DEBUG (--verbose) shows them.
if not os.environ.get("EHRLAKE_DEBUG"):
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
    warnings.filterwarnings("ignore", category=UnicodeWarning, module=r"petastorm(\.|$)")
    warnings.filterwarnings("ignore", message="Arrow optimization failed to enable", category=RuntimeWarning)
    # Keras notices repeated by every worker: its BatchNormalization's autograph code touches a
    # deprecated property, and a callback timing note on short batches (the epoch lines say more)
    warnings.filterwarnings("ignore", message=r"`layer\.updates` will be removed", category=UserWarning)
    logging.getLogger("tensorflow").addFilter(
        lambda record: not record.getMessage().startswith("Callback method `on_train_batch_end` is slow")
    )
