"""Put first on PYTHONPATH (tests/test_bench.py), this makes the packages that the GPU machine lacks
unimportable, so a CPU dry run of bench/gpu_session.sh fails here where it would fail there."""
import importlib.abc
import sys

MISSING = {"grain", "ml_collections", "tensorflow_datasets", "tensorboardX", "gradio", "diffusers", "gcsfs",
           "array_record", "tensorflow"}


class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the GPU machine)")
        return None


sys.meta_path.insert(0, _Missing())
