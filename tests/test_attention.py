"""The attention function against a float64 numpy reference."""

import numpy as np
import pytest

from pixelflow_jax.attention import dot_product_attention


def reference_attention(q, k, v, key_mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits + (1.0 - key_mask[:, None, None, :]) * -10000.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("with_mask", [False, True])
def test_xla_matches_float64_reference(with_mask):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 16, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    v = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], np.float32) if with_mask else None
    out = np.asarray(dot_product_attention(q, k, v, key_mask=mask))
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_all_padding_row_attends_uniformly_like_the_release():
    # A -10000 bias (not -inf) cancels in the softmax when every key is padding: no NaN. In float32
    # the logits near -10000 keep only ~1e-3 of precision, as in the release.
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 4, 2, 8)).astype(np.float32) for _ in range(3))
    out = np.asarray(dot_product_attention(q, k, v, key_mask=np.zeros((1, 4), np.float32)))
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=1e-2)


def test_bad_arguments():
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        dot_product_attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="key_mask must have shape"):
        dot_product_attention(q, q, q, key_mask=np.ones((1, 3)))
