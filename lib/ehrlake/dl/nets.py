"""The networks: a small CNN for abnormality detection on image slices, an MLP for tabular features.

Both end in one sigmoid unit (binary finding / risk). The CNN's last convolution is named
``last_conv`` so Grad-CAM (``saliency.py``) can find it."""

from __future__ import annotations

from ehrlake.dl.runtime import keras


def cnn(
    shape: tuple[int, ...],
    filters=(32, 64, 128),
    dropout: float = 0.3,
    augment: bool = True,
    norm=None,
    momentum: float = 0.9,
):
    """``norm``: batch-normalisation layer factory (distributed training passes a synchronised one;
    the saved model uses the plain layer, which has the same weights). ``momentum`` 0.9 rather than
    Keras' 0.99: small image sets give few steps per epoch, and validation (which uses the moving
    statistics) would otherwise lag training by tens of epochs."""
    k = keras()
    layers = k.layers
    norm = norm or layers.BatchNormalization
    inputs = k.Input(shape=shape, name="pixels")
    x = inputs
    if augment:  # active in training only; ultrasound and X-ray slices are not orientation-fixed
        x = layers.RandomFlip("horizontal")(x)
        x = layers.RandomTranslation(0.08, 0.08, fill_mode="constant")(x)
        x = layers.RandomZoom(0.1, fill_mode="constant")(x)
    for i, n in enumerate(filters):
        last = i == len(filters) - 1
        x = layers.Conv2D(n, 3, padding="same", use_bias=False)(x)
        x = norm(name=f"bn{i}a", momentum=momentum)(x)
        x = layers.Activation("relu")(x)
        x = layers.Conv2D(n, 3, padding="same", use_bias=False)(x)
        x = norm(name=f"bn{i}b", momentum=momentum)(x)
        x = layers.Activation("relu", name="last_conv" if last else None)(x)
        if not last:
            x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="finding")(x)
    return k.Model(inputs, outputs, name="cnn")


def ann(inputs: int, hidden=(64, 32), dropout: float = 0.2):
    k = keras()
    layers = k.layers
    x_in = k.Input(shape=(inputs,), name="features")
    x = x_in
    for n in hidden:
        x = layers.Dense(n, activation="relu")(x)
        x = layers.Dropout(dropout)(x)
    return k.Model(x_in, layers.Dense(1, activation="sigmoid", name="risk")(x), name="ann")
