"""The federated tabular ANN's local training at a site, in TensorFlow (the deep-learning runtime).

The network is central training's (:func:`ehrlake.dl.nets.ann`, conf/deep_learning.yaml ``ann``),
reading the same standardised inputs (the federation's pooled mean and scale, a missing value
set to the mean). Each round a site takes ``local_steps`` Adam steps from the global weights, each
on a Poisson sample of its training rows (each row joins with probability ``sample_rate``: the
sampling the privacy accountant assumes, used with and without privacy so the two differ only in
clipping and noise). The loss is the plain binary cross-entropy, so scores are probabilities as
the central ANN's. FedProx adds ``mu/2 |w - w_global|^2``.

With patient-level privacy each step is DP-SGD: every row's gradient (all layers' together) is
clipped to norm ``clip``, their sum gets Gaussian noise of deviation ``noise x clip`` and is divided
by the expected sample; Adam then takes the noisy gradient (post-processing costs no privacy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrlake.dl import runtime


@dataclass(frozen=True)
class Local:
    """How a site trains in a round (the ServerApp's train config)."""

    steps: int
    rate: float
    learning_rate: float
    proximal_mu: float = 0.0
    clip: float | None = None  # with noise: patient-level DP-SGD
    noise: float = 0.0


def network(inputs: int, hidden: list[int], dropout: float):
    from ehrlake.dl import nets

    return nets.ann(inputs, tuple(hidden), dropout)


def initial_weights(inputs: int, hidden: list[int], dropout: float, seed: int) -> list[np.ndarray]:
    """The global model of round 0: the network's seeded initialisation."""
    runtime.keras().utils.set_random_seed(seed)
    return [w.astype("float32") for w in network(inputs, hidden, dropout).get_weights()]


def fit(
    start: list[np.ndarray],
    z: np.ndarray,
    y: np.ndarray,
    hidden: list[int],
    dropout: float,
    local: Local,
    seed: list[int],
) -> tuple[list[np.ndarray], float]:
    """The site's weights after a round of local training from ``start``, and its mean training
    loss at the end (on all its rows, without dropout)."""
    tf = runtime.tensorflow()
    k = runtime.keras()
    k.utils.set_random_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    rng = np.random.default_rng(seed)
    model = network(z.shape[1], hidden, dropout)
    model.set_weights(start)
    anchor = [tf.constant(w) for w in start]
    variables = model.trainable_variables
    optimizer = k.optimizers.Adam(local.learning_rate)
    bce = k.losses.BinaryCrossentropy(reduction="none")
    x_all = tf.constant(z, tf.float32)
    y_all = tf.constant(y.reshape(-1, 1), tf.float32)
    expected = local.rate * len(y)

    def proximal(grads):
        if not local.proximal_mu:
            return grads
        return [g + local.proximal_mu * (v - a) for g, v, a in zip(grads, variables, anchor, strict=True)]

    for _ in range(local.steps):
        take = np.flatnonzero(rng.random(len(y)) < local.rate)
        if len(take) == 0:
            grads = [tf.zeros_like(v) for v in variables]
        else:
            x, t = tf.gather(x_all, take), tf.gather(y_all, take)
            with tf.GradientTape(persistent=local.clip is not None) as tape:
                losses = bce(t, model(x, training=True))
                mean = tf.reduce_mean(losses)
            if local.clip is None:
                grads = tape.gradient(mean, variables)
            else:
                grads = _private(tape, losses, variables, local, expected, rng)
            del tape
        optimizer.apply_gradients(zip(proximal(grads), variables, strict=True))
    final = float(tf.reduce_mean(bce(y_all, model(x_all, training=False))))
    return [w.astype("float32") for w in model.get_weights()], final


def _private(tape, losses, variables, local: Local, expected: float, rng):
    """DP-SGD's gradient: per-row gradients clipped to ``clip`` jointly over all layers, summed,
    noised and divided by the expected sample size."""
    tf = runtime.tensorflow()
    per_row = tape.jacobian(losses, variables, experimental_use_pfor=True)  # each (rows, *shape)
    flat = tf.concat([tf.reshape(g, (tf.shape(g)[0], -1)) for g in per_row], axis=1)
    scale = tf.minimum(1.0, local.clip / tf.maximum(tf.norm(flat, axis=1), 1e-12))
    out = []
    for g, v in zip(per_row, variables, strict=True):
        clipped = tf.reduce_sum(g * tf.reshape(scale, (-1,) + (1,) * len(v.shape)), axis=0)
        noise = rng.normal(0.0, local.noise * local.clip, size=v.shape).astype("float32")
        out.append((clipped + noise) / expected)
    return out
