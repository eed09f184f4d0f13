"""Which events of a record raised or lowered a sequence model's risk: integrated gradients
(Sundararajan et al., 2017), the one attribution method of the sequence models.

The path runs from a baseline record to the patient's: every event's token embedding moves from
the embedding of ``[MASK]`` (the token pretraining taught the encoder to read as "an event is here,
which one is unknown") to its own, while the ages, positions and which positions hold an event stay
the patient's. An event's attribution is the integral of the risk's log-odds gradient along that
path times its embedding's change, summed over the embedding; the attributions of a record add up
to its log-odds minus the baseline's (completeness), up to the integral's approximation error,
which :func:`integrated_gradients` returns so a caller can show it (``steps`` midpoint steps).

The classifier's own layers compute the path (:func:`logit_from_embeddings` runs the encoder of
``nets.sequence_encoder`` from its embeddings on), and a test holds it to the saved model's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrlake.dl import nets, runtime

MASK_ID = 1  # features.sequences.SPECIAL: [PAD] [MASK] [CLS] [UNK]
METHOD = "integrated gradients over event embeddings ([MASK] baseline, {steps} steps)"


@dataclass(frozen=True)
class Attribution:
    """Per record: ``events`` (n, length) log-odds attributions (0 at padding), ``logit`` and
    ``baseline_logit`` (n,), and ``gap``: |sum of attributions - (logit - baseline_logit)|."""

    events: np.ndarray
    logit: np.ndarray
    baseline_logit: np.ndarray
    gap: np.ndarray


def _blocks(encoder) -> int:
    return sum(1 for layer in encoder.layers if layer.name.startswith("attention"))


def logit_from_embeddings(model, embedded, tokens):
    """The sequence classifier's log-odds from the event embeddings (token + age + position,
    ``(n, length, dim)``) on: the encoder's transformer blocks (inference: no dropout), the mean
    over real positions, the risk unit before its sigmoid."""
    tf = runtime.tensorflow()
    encoder = model.get_layer("sequence_encoder")
    mask = encoder.get_layer("padding_mask")(tokens)
    x = embedded
    for i in range(_blocks(encoder)):
        h = encoder.get_layer(f"ln{i}a")(x)
        x = x + encoder.get_layer(f"attention{i}")(h, h, attention_mask=mask, training=False)
        h = encoder.get_layer(f"ffn{i}a")(encoder.get_layer(f"ln{i}b")(x))
        x = x + encoder.get_layer(f"ffn{i}b")(h)
    x = encoder.get_layer("encoded")(x)
    pooled = nets.sequence_layers()["MaskedMean"]()([x, tokens])
    risk = model.get_layer("risk")
    return tf.squeeze(tf.matmul(pooled, risk.kernel) + risk.bias, -1)


def _embeddings(model, tokens, ages):
    """(token embeddings of the record, of its baseline, age + position embeddings)."""
    tf = runtime.tensorflow()
    layer = model.get_layer("sequence_encoder").get_layer("event_embedding")
    baseline = tf.where(tokens != 0, tf.fill(tf.shape(tokens), MASK_ID), tokens)
    positions = tf.range(tf.shape(tokens)[1])[None, :]
    rest = layer.age(tf.clip_by_value(ages, 0, nets.MAX_AGE)) + layer.position(positions)
    return layer.token(tokens), layer.token(baseline), rest


def integrated_gradients(model, x: np.ndarray, steps: int = 32) -> Attribution:
    """Attributions of ``x`` (float32 ``(n, 2, length)``: token ids, ages; the tensors' layout)."""
    tf = runtime.tensorflow()
    tokens = tf.constant(x[:, 0, :].astype("int32"))
    ages = tf.constant(x[:, 1, :].astype("int32"))
    own, base, rest = _embeddings(model, tokens, ages)
    delta = own - base
    total = tf.zeros_like(own)
    for alpha in (np.arange(steps, dtype="float32") + 0.5) / steps:
        point = base + float(alpha) * delta
        with tf.GradientTape() as tape:
            tape.watch(point)
            logit = logit_from_embeddings(model, point + rest, tokens)
        total += tape.gradient(logit, point)
    events = tf.reduce_sum(delta * total / steps, axis=-1) * tf.cast(tokens != 0, tf.float32)
    logit = logit_from_embeddings(model, own + rest, tokens).numpy()
    baseline_logit = logit_from_embeddings(model, base + rest, tokens).numpy()
    events = events.numpy()
    gap = np.abs(events.sum(axis=1) - (logit - baseline_logit))
    return Attribution(events, logit, baseline_logit, gap)
