"""The platform jax is asked for (JAX_PLATFORMS), checked as the job starts: jax's refusal is a
traceback (an AssertionError with no message for cuda on a machine without NVIDIA GPUs)."""

from __future__ import annotations

from pixelflow_jax.error_text import first_line


def platform_error() -> str | None:
    """None where jax starts its backends; else one line naming the platform asked for and the fix."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        asked = jax.config.jax_platforms
        # jax's own advice ends its message; ours below names the same setting in full
        cause = first_line(e).split(" (set JAX_PLATFORMS=")[0].split(" (you may need to uninstall")[0]
        if isinstance(e, AssertionError):
            cause = "no device of it is visible"
        if asked:
            return (f"JAX_PLATFORMS={asked} asks jax for a platform it cannot start here ({cause}): unset "
                    "JAX_PLATFORMS to use what this machine has, set it to cpu to run on the CPU, or install jax for "
                    "that platform (jax[cuda12], jax[tpu])")
        return (f"jax cannot start its backends ({cause}): set JAX_PLATFORMS=cpu to run on the CPU, or uninstall "
                "the failing jax plugin")
    return None
