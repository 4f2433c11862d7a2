"""What a job's numbers depend on besides its settings and inputs: the versions of Python and of
the libraries that compute them, and the devices they ran on. Recorded with each job's results
(eval.json, samples/sampling_runs.jsonl, training_runs.jsonl, inspect.json), so that a number read
from a workdir says what produced it: another jax or XLA compiles other kernels, another numpy
rounds the metrics' linear algebra otherwise, and a GPU's kernels are not a CPU's."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import jax

# The packages whose version changes a result: the compiler and its kernels, the model's and the
# optimiser's code, the checkpoint format, the host-side arithmetic (metrics, image packing).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
# The accelerator plug-ins (CUDA kernels, the TPU runtime): named where installed, as each machine has its own.
ACCELERATOR_PACKAGES = ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu")


def package_version(name: str) -> str | None:
    """The installed version of the distribution `name`; None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict:
    """{"python": version, "packages": {name: version or None}}; accelerator plug-ins only where installed."""
    packages = {name: package_version(name) for name in PACKAGES}
    packages.update({name: version for name in ACCELERATOR_PACKAGES if (version := package_version(name))})
    return {"python": platform.python_version(), "packages": packages}


def version_fields() -> dict[str, str]:
    """Python's and every package's version (of PACKAGES and ACCELERATOR_PACKAGES, "not installed"
    where absent), by name, the same names on every host: what the processes of a job must agree on."""
    versions = {name: package_version(name) or "not installed" for name in (*PACKAGES, *ACCELERATOR_PACKAGES)}
    return {"python": platform.python_version(), **versions}


def devices_used() -> dict:
    """The backend (cpu, gpu, tpu), its runtime's version (a CUDA or TPU runtime names its own), the
    kind of device, and how many devices and processes the job has (local: this process's)."""
    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "platform_version": device.client.platform_version,
            "device_kind": device.device_kind, "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "process_count": jax.process_count()}


# jax takes two names for each of three precisions (lax.Precision's), and unset compiles as the first,
# DEFAULT: compared under one name, a host or a resume that spelled the same arithmetic another way was
# refused or warned of another precision.
MATMUL_PRECISION_SYNONYMS = {"bfloat16": None, "default": None, "tensorfloat32": "high", "float32": "highest"}


def matmul_precision_named_once(precision: str | None) -> str | None:
    """A jax_default_matmul_precision value under one name for each precision (None: unset, and the
    names of the precision it compiles)."""
    return MATMUL_PRECISION_SYNONYMS.get(precision, precision)


def settings_outside_the_config() -> dict:
    """jax's matmul precision (JAX_DEFAULT_MATMUL_PRECISION, jax.default_matmul_precision: a bfloat16
    model's matmuls and training's on GPUs and TPUs; a float32 model samples at "highest" whatever it
    says) and XLA_FLAGS, as the process has them; None where unset (the platform's defaults)."""
    return {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS")}


def job_environment() -> dict:
    """software_versions, devices_used and settings_outside_the_config, as one record's "environment"."""
    return {**software_versions(), "devices": devices_used(), "settings": settings_outside_the_config()}
