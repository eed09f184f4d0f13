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

import os

# Before anything imports TensorFlow (Horovod and Petastorm do at import): the legacy tf-keras,
# which Horovod's optimizer wrapper and MultiWorkerMirroredStrategy need (runtime.py).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
