"""The networks: a small CNN for abnormality detection on image slices, an MLP for tabular features,
and a transformer encoder of patient event sequences (with its masked-code pretraining head).

The CNN and the MLP end in one sigmoid unit (binary finding / risk). The CNN's last convolution is named
``last_conv`` so Grad-CAM (``saliency.py``) can find it."""

from __future__ import annotations

from functools import cache

from ehrlake.dl.runtime import keras, tensorflow


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
    inputs = k.Input(shape=shape, name="pixels")
    x = inputs
    if augment:  # active in training only; ultrasound and X-ray slices are not orientation-fixed
        x = augmentation(x)
    x = layers.GlobalAveragePooling2D()(_trunk(x, filters, norm or layers.BatchNormalization, momentum))
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="finding")(x)
    return k.Model(inputs, outputs, name="cnn")


def augmentation(x, strength: float = 1.0):
    """Random flips, shifts and zoom (``strength`` scales them; training only)."""
    layers = keras().layers
    x = layers.RandomFlip("horizontal")(x)
    x = layers.RandomTranslation(0.08 * strength, 0.08 * strength, fill_mode="constant")(x)
    return layers.RandomZoom(0.1 * strength, fill_mode="constant")(x)


def _trunk(x, filters, norm, momentum):
    """The convolution blocks; layers named so a pretrained trunk's weights load by name."""
    layers = keras().layers
    for i, n in enumerate(filters):
        last = i == len(filters) - 1
        x = layers.Conv2D(n, 3, padding="same", use_bias=False, name=f"conv{i}a")(x)
        x = norm(name=f"bn{i}a", momentum=momentum)(x)
        x = layers.Activation("relu")(x)
        x = layers.Conv2D(n, 3, padding="same", use_bias=False, name=f"conv{i}b")(x)
        x = norm(name=f"bn{i}b", momentum=momentum)(x)
        x = layers.Activation("relu", name="last_conv" if last else None)(x)
        if not last:
            x = layers.MaxPooling2D()(x)
    return x


def image_encoder(shape: tuple[int, ...], filters=(32, 64, 128), norm=None, momentum: float = 0.9):
    """The CNN's convolution trunk and pooling without its head: an image's embedding (contrastive
    pretraining, ``contrastive.py``)."""
    k = keras()
    inputs = k.Input(shape=shape, name="pixels")
    x = _trunk(inputs, filters, norm or k.layers.BatchNormalization, momentum)
    return k.Model(inputs, k.layers.GlobalAveragePooling2D(name="image_embedding")(x), name="image_encoder")


def ann(inputs: int, hidden=(64, 32), dropout: float = 0.2):
    k = keras()
    layers = k.layers
    x_in = k.Input(shape=(inputs,), name="features")
    x = x_in
    for n in hidden:
        x = layers.Dense(n, activation="relu")(x)
        x = layers.Dropout(dropout)(x)
    return k.Model(x_in, layers.Dense(1, activation="sigmoid", name="risk")(x), name="ann")


def sequence_encoder(
    vocab_size: int, length: int, dim: int = 64, layers: int = 2, heads: int = 4, dropout=0.1
):
    """A small BERT-style encoder of event sequences: token + age + position embeddings, ``layers``
    pre-norm transformer blocks; ``[PAD]`` (id 0) positions are masked out of attention. Outputs
    one vector per position (``tokens``: int ids, ``ages``: whole years, both ``(length,)``)."""
    k = keras()
    L = k.layers
    own = sequence_layers()
    tokens = k.Input(shape=(length,), dtype="int32", name="tokens")
    ages = k.Input(shape=(length,), dtype="int32", name="ages")
    x = own["EventEmbedding"](vocab_size, length, dim, name="event_embedding")([tokens, ages])
    x = L.Dropout(dropout)(x)
    attention_mask = own["PaddingMask"](name="padding_mask")(tokens)
    for i in range(layers):
        h = L.LayerNormalization(name=f"ln{i}a")(x)
        h = L.MultiHeadAttention(heads, dim // heads, dropout=dropout, name=f"attention{i}")(
            h, h, attention_mask=attention_mask
        )
        x = L.Add()([x, L.Dropout(dropout)(h)])
        h = L.LayerNormalization(name=f"ln{i}b")(x)
        h = L.Dense(dim * 4, activation="gelu", name=f"ffn{i}a")(h)
        x = L.Add()([x, L.Dropout(dropout)(L.Dense(dim, name=f"ffn{i}b")(h))])
    x = L.LayerNormalization(name="encoded")(x)
    return k.Model([tokens, ages], x, name="sequence_encoder")


def masked_code_model(encoder, vocab_size: int):
    """The encoder with a head predicting each position's token (logits): masked-code pretraining."""
    k = keras()
    logits = k.layers.Dense(vocab_size, name="code_logits")(encoder.output)
    return k.Model(encoder.inputs, logits, name="masked_code_model")


def patient_embedding(encoder):
    """The mean of the encoder's vectors over a sequence's real (non-pad) positions."""
    k = keras()
    pooled = sequence_layers()["MaskedMean"](name="patient_embedding")([encoder.output, encoder.inputs[0]])
    return k.Model(encoder.inputs, pooled, name="patient_embedding")


def sequence_classifier(encoder, dropout: float = 0.1):
    """A patient task's risk from a sequence: the encoder (pretrained or not), the mean of its
    vectors over the real positions, one sigmoid unit. Its input is the tensors' float32 ``(2,
    length)`` (token ids, ages), split and cast inside, so the common training loop feeds it."""
    k = keras()
    length = encoder.inputs[0].shape[1]
    x = k.Input(shape=(2, length), name="sequence")
    tokens, ages = sequence_layers()["SplitSequence"](name="split_sequence")(x)
    pooled = sequence_layers()["MaskedMean"](name="patient_embedding")([encoder([tokens, ages]), tokens])
    risk = k.layers.Dense(1, activation="sigmoid", name="risk")(k.layers.Dropout(dropout)(pooled))
    return k.Model(x, risk, name="sequence_classifier")


MAX_AGE = 120


@cache
def sequence_layers() -> dict:
    """The encoder's own layers, serialisable (a saved encoder loads with these as its custom
    objects; Lambda layers would need unsafe deserialisation)."""
    tf, k = tensorflow(), keras()

    class EventEmbedding(k.layers.Layer):
        """Token + age (0-120 years) + position embeddings of ``[tokens, ages]``."""

        def __init__(self, vocab_size, length, dim, **kw):
            super().__init__(**kw)
            self.vocab_size, self.length, self.dim = vocab_size, length, dim
            self.token = k.layers.Embedding(vocab_size, dim, name="token")
            self.age = k.layers.Embedding(MAX_AGE + 1, dim, name="age")
            self.position = k.layers.Embedding(length, dim, name="position")

        def call(self, inputs):
            tokens, ages = inputs
            positions = tf.range(tf.shape(tokens)[1])[None, :]
            return (
                self.token(tokens) + self.age(tf.clip_by_value(ages, 0, MAX_AGE)) + self.position(positions)
            )

        def get_config(self):
            return {
                **super().get_config(),
                "vocab_size": self.vocab_size,
                "length": self.length,
                "dim": self.dim,
            }

    class PaddingMask(k.layers.Layer):
        """Which positions may attend to which: both real tokens (not ``[PAD]``, id 0)."""

        def call(self, tokens):
            real = tf.not_equal(tokens, 0)
            return tf.logical_and(real[:, None, :], real[:, :, None])

    class MaskedMean(k.layers.Layer):
        """``[vectors, tokens]`` -> the mean vector over the real positions."""

        def call(self, inputs):
            x, tokens = inputs
            real = tf.cast(tf.not_equal(tokens, 0), x.dtype)[..., None]
            return tf.reduce_sum(x * real, axis=1) / tf.maximum(tf.reduce_sum(real, axis=1), 1.0)

    class SplitSequence(k.layers.Layer):
        """float32 ``(2, length)`` -> int token ids, int ages."""

        def call(self, x):
            return tf.cast(x[:, 0, :], tf.int32), tf.cast(x[:, 1, :], tf.int32)

    return {c.__name__: c for c in (EventEmbedding, PaddingMask, MaskedMean, SplitSequence)}


def save_portable(plain, weights, path: str) -> None:
    """Save trained ``weights`` in ``plain``, the same network built with plain layers (no Horovod
    or strategy classes, no optimizer state), so any TensorFlow process loads the file and saving
    involves no other rank."""
    plain.set_weights(weights)
    plain.save(path)
