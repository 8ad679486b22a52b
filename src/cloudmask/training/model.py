"""The reference U-Net (spec §3) in Keras 3 layers only, so it runs on the TensorFlow, JAX and PyTorch backends.

Per level: two 3x3 'same' convolutions (he_normal, with bias), each followed by a separate ReLU layer; 2x2 max
pooling down; nearest-neighbour 2x upsampling; skip connections concatenated as [upsampled, skip]; a 1x1 sigmoid
head giving P(cloud), he_normal like every other convolution (reference model.py). No batch normalisation, no
dropout. Defaults (filters 32, depth 3) give 1,948,609 parameters and the reference's 39 layers.
"""

from __future__ import annotations

import keras
from keras import layers

REFERENCE_PARAMETERS = 1_948_609


def _conv_block(x, filters: int, prefix: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal", name=f"{prefix}_conv{i}")(x)
        x = layers.ReLU(name=f"{prefix}_relu{i}")(x)
    return x


def build_unet(patch_size: int = 256, channels: int = 9, filters: int = 32, depth: int = 3,
               name: str = "cloudmask_unet") -> keras.Model:
    inputs = keras.Input(shape=(patch_size, patch_size, channels), name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = _conv_block(x, filters * 2**level, f"enc{level + 1}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
    x = _conv_block(x, filters * 2**depth, "bottleneck")
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(2, interpolation="nearest", name=f"dec{level + 1}_up")(x)
        x = layers.Concatenate(name=f"dec{level + 1}_concat")([x, skips[level]])
        x = _conv_block(x, filters * 2**level, f"dec{level + 1}")
    # float32 head keeps the probabilities (and the loss) in full precision under a mixed-precision policy
    outputs = layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="he_normal", dtype="float32",
                            name="cloud_probability")(x)
    return keras.Model(inputs, outputs, name=name)


def build_from_config(cfg) -> keras.Model:
    return build_unet(cfg.image.patch_size, 9, cfg.model.filters, cfg.model.depth)


def compile_model(model: keras.Model, learning_rate: float, accumulation_steps: int = 1,
                  jit_compile="auto") -> keras.Model:
    """Adam with Keras default betas/epsilon, mean binary cross-entropy on probabilities, accuracy at 0.5.

    With ``accumulation_steps`` > 1 the optimizer averages the gradients of that many micro-batches before one
    update (and counts one step): the update of the whole batch, with the activations of a micro-batch.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate,
                                        gradient_accumulation_steps=accumulation_steps if accumulation_steps > 1
                                        else None),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.5)],
        jit_compile=jit_compile,
    )
    return model


def forward_flops(model: keras.Model) -> int:
    """Multiply-adds x 2 of one forward pass over one patch (convolutions only; ReLU/pool/concat are negligible)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            out_h, out_w, out_c = layer.output.shape[1:]
            kh, kw = layer.kernel_size
            in_c = layer.input.shape[-1]
            total += 2 * out_h * out_w * out_c * kh * kw * in_c
    return int(total)
