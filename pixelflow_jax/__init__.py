"""pixelflow-jax: PixelFlow (Chen et al. 2025) in JAX / Flax NNX."""

from pixelflow_jax.api import load_model
from pixelflow_jax.checkpoints.checkpoint import CheckpointConfig, CheckpointError
from pixelflow_jax.checkpoints.convert import ConversionError
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.model import PixelFlow
from pixelflow_jax.scheduler import PixelFlowScheduler

__all__ = ["load_model", "CheckpointConfig", "CheckpointError", "ConversionError", "ModelConfig", "PixelFlow",
           "PixelFlowScheduler"]
