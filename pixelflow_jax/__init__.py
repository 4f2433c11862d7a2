"""pixelflow-jax: PixelFlow (Chen et al. 2025) in JAX / Flax NNX.

The names below are imported when first used, so that `import pixelflow_jax.command_line` (what
the command-line tools need before their flags are read, or a Ctrl-C is handled) does not load
jax and the model.
"""

import importlib

_MODULE_OF = {"load_model": "pixelflow_jax.api", "CheckpointConfig": "pixelflow_jax.checkpoints.checkpoint",
              "CheckpointError": "pixelflow_jax.checkpoints.checkpoint",
              "ConversionError": "pixelflow_jax.checkpoints.convert", "ModelConfig": "pixelflow_jax.config",
              "PixelFlow": "pixelflow_jax.model", "PixelFlowScheduler": "pixelflow_jax.scheduler"}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pixelflow_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
