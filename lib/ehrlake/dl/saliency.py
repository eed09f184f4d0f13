"""Grad-CAM: where in an image the CNN looked for its finding (Selvaraju et al., 2017).

The gradient of the predicted class's logit (the finding's logit, negated where the model predicts
"no finding") with respect to the last convolution's feature maps, averaged per channel, weights
those maps; their positive sum, upsampled to the image, is the heat map. A
figure of a few held-out images (the most confident findings of each class) goes next to the
model's artifact and into the HTML report.
"""

from __future__ import annotations

import numpy as np

from ehrlake.dl.runtime import keras, tensorflow


def gradcam(model, images: np.ndarray, layer: str = "last_conv") -> np.ndarray:
    """(n, H, W) heat maps in [0, 1] for ``images`` of shape (n, H, W, 1), for the predicted class."""
    tf = tensorflow()
    k = keras()
    probe = k.Model(model.inputs, [model.get_layer(layer).output, model.output])
    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        maps, prob = probe(x, training=False)
        p = tf.clip_by_value(prob[:, 0], 1e-6, 1 - 1e-6)
        logit = tf.math.log(p / (1 - p))
        # evidence for the class the model predicts: a "0" finding is where the logit is pushed down
        target = tf.where(p >= 0.5, logit, -logit)
    grads = tape.gradient(target, maps)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[..., None]
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)


def figure(model, images: np.ndarray, labels, scores, path: str, title: str) -> None:
    """A PNG of images (top row) and their Grad-CAM overlays (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cams = gradcam(model, images)
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4.0), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i, :, :, 0], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"label {int(labels[i])}\nscore {scores[i]:.2f}", fontsize=8)
        axes[1, i].imshow(images[i, :, :, 0], cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(cams[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        for row in (0, 1):
            axes[row, i].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
