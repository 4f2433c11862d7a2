"""The release's initialisation for training from scratch."""

import numpy as np
import pytest
from flax import nnx

from pixelflow_jax import ModelConfig, PixelFlow


@pytest.fixture(scope="module")
def params():
    cfg = ModelConfig(num_attention_heads=4, attention_head_dim=16, depth=3, num_classes=10, cross_attention_dim=24)
    model = PixelFlow(cfg, rngs=nnx.Rngs(0))
    return cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_zero_initialised_layers(params):
    _, p = params
    for leaf in (p["transformer_blocks"]["norm1"]["linear"]["kernel"],
                 p["transformer_blocks"]["norm1"]["linear"]["bias"],
                 p["proj_out_1"]["kernel"], p["proj_out_1"]["bias"], p["proj_out_2"]["kernel"], p["proj_out_2"]["bias"],
                 p["transformer_blocks"]["attn1"]["q_proj"]["bias"], p["patch_embed"]["proj"]["bias"]):
        assert not np.asarray(leaf).any()


def test_normal_002_layers(params):
    _, p = params
    for leaf in (p["timestep_embedder"]["linear_1"]["kernel"], p["latent_size_embedder"]["linear_2"]["kernel"],
                 p["class_embedder"]["embedding_table"]["embedding"]):
        assert np.std(np.asarray(leaf)) == pytest.approx(0.02, rel=0.1)


def test_xavier_uniform_layers_and_independent_blocks(params):
    cfg, p = params
    c = cfg.hidden_size
    fc1 = np.asarray(p["transformer_blocks"]["mlp"]["fc1"]["kernel"])  # (depth, C, 4C)
    bound = np.sqrt(6.0 / (c + 4 * c))
    assert np.abs(fc1).max() <= bound and np.abs(fc1).max() > 0.9 * bound
    assert not np.allclose(fc1[0], fc1[1])  # each layer drew its own weights
    patch = np.asarray(p["patch_embed"]["proj"]["kernel"])  # the conv viewed as a (48, C) matrix
    assert np.abs(patch).max() <= np.sqrt(6.0 / (48 + c))
    cross_k = np.asarray(p["transformer_blocks"]["attn2"]["k_proj"]["kernel"])
    assert cross_k.shape == (3, 24, c)
    assert np.all(np.asarray(p["transformer_blocks"]["norm3"]["weight"]) == 1)
