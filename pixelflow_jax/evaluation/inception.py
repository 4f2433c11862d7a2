"""The FID Inception-v3 (the 2015-12-05 TensorFlow graph used by the ADM evaluation suite and by
pytorch-fid) in Flax NNX, for FID / sFID / IS features.

    pool, spatial, logits = InceptionV3()(images)   # images uint8-valued (B, H, W, 3)

  - input: resized to 299 x 299 by TensorFlow's legacy bilinear resize (align_corners=False,
    no half-pixel offset: source = destination * in / out), then (x - 128) / 128, as the graph
    does after its ExpandDims input;
  - pool: the 2048-d `pool_3` features (FID, precision / recall);
  - spatial: `mixed_6/conv`, the 1x1 branch of the fourth 17x17 block (Mixed_6d), first 7 channels,
    flattened to 17 * 17 * 7 = 2023 values (sFID);
  - logits: pool times the 1008-class softmax weights without their bias, as ADM's Inception
    Score takes them.

The blocks are torchvision's Inception-v3 with pytorch-fid's patches that make it the TensorFlow
graph: average pools ignore padding, and the last block max-pools. Module names mirror
pytorch-fid's state dict (`Mixed_5b.branch1x1.conv.weight` ...), so its weights file
(pt_inception-2015-12-05-6726825d.pth) converts mechanically (inception_convert.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7


class BasicConv(nnx.Module):
    """Convolution without bias, batch norm (inference statistics), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride: int = 1, padding=0):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.kernel = nnx.Param(jnp.zeros((kh, kw, in_channels, out_channels)))
        self.bn_scale = nnx.Param(jnp.ones((out_channels,)))
        self.bn_bias = nnx.Param(jnp.zeros((out_channels,)))
        self.bn_mean = nnx.Param(jnp.zeros((out_channels,)))
        self.bn_var = nnx.Param(jnp.ones((out_channels,)))
        self.stride, self.padding = stride, ((ph, ph), (pw, pw))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride), self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        y = (y - self.bn_mean[...]) * jax.lax.rsqrt(self.bn_var[...] + BN_EPS) * self.bn_scale[...] + self.bn_bias[...]
        return jax.nn.relu(y)


def max_pool(x, size: int, stride: int, padding: int = 0):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pad)


def average_pool_ignoring_padding(x):
    """3x3, stride 1, padding 1, dividing by the number of real pixels (TensorFlow's average pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window = ((1, 3, 3, 1), (1, 1, 1, 1), pad)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window)
    count = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, *window)
    return total / count


class InceptionA(nnx.Module):
    def __init__(self, c: int, pool_features: int):
        self.branch1x1 = BasicConv(c, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv(c, 48, 1), BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(c, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(c, pool_features, 1)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(average_pool_ignoring_padding(x))], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, c: int):
        self.branch3x3 = BasicConv(c, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(c, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, c: int, c7: int):
        self.branch1x1 = BasicConv(c, 192, 1)
        self.branch7x7_1 = BasicConv(c, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(c, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(c, 192, 1)

    def __call__(self, x):
        double = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            double = conv(double)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(average_pool_ignoring_padding(x))], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, c: int):
        self.branch3x3_1, self.branch3x3_2 = BasicConv(c, 192, 1), BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(c, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """pool='average' (Mixed_7b) or 'max' (Mixed_7c: the TensorFlow graph max-pools there)."""

    def __init__(self, c: int, pool: str):
        self.branch1x1 = BasicConv(c, 320, 1)
        self.branch3x3_1 = BasicConv(c, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(c, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(c, 192, 1)
        self.pool = pool

    def __call__(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = average_pool_ignoring_padding(x) if self.pool == "average" else max_pool(x, 3, 1, padding=1)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled)], axis=-1)


def legacy_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) interpolation weights of TensorFlow 1's resize_bilinear(align_corners=False)."""
    # float32 coordinates, as TensorFlow computes them (float64 moved pixels by up to 0.007 grey levels)
    source = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    weights = np.zeros((out_size, in_size))
    weights[np.arange(out_size), low] += 1 - frac
    weights[np.arange(out_size), high] += frac
    return weights


def resize_to_input(images: jax.Array) -> jax.Array:
    _, height, width, _ = images.shape
    rows = jnp.asarray(legacy_bilinear_matrix(height, INPUT_SIZE), jnp.float32)
    cols = jnp.asarray(legacy_bilinear_matrix(width, INPUT_SIZE), jnp.float32)
    return jnp.einsum("oh,bhwc,pw->bopc", rows, images.astype(jnp.float32), cols,
                      precision=jax.lax.Precision.HIGHEST)


class InceptionV3(nnx.Module):
    def __init__(self):
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "average"), InceptionE(2048, "max")
        self.fc_weight = nnx.Param(jnp.zeros((2048, NUM_LOGITS)))

    def __call__(self, images: jax.Array, *, resize: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        """images (B, H, W, 3) with values in [0, 255] -> (pool (B, 2048), spatial (B, 2023),
        logits (B, 1008)), float32. resize=False takes images already 299 x 299."""
        x = resize_to_input(images) if resize else images.astype(jnp.float32)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, 3, 2)))
        x = max_pool(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(axis=(1, 2))
        return pool, spatial, jnp.dot(pool, self.fc_weight[...], precision=jax.lax.Precision.HIGHEST)
