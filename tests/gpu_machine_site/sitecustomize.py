"""Put first on PYTHONPATH (tests/test_bench.py), this makes the packages that the GPU machine lacks
unimportable, so a CPU dry run of bench/gpu_session.sh fails here where it would fail there. They
are hidden from every import finder, so that they look as absent as there: an import raises
ModuleNotFoundError, importlib.util.find_spec answers None (etils asks it about tensorflow) and
importlib.metadata finds no such distribution (data/sources.py asks for array-record's version)."""
import re
import sys

MISSING = {"grain", "ml_collections", "tensorflow_datasets", "tensorboardX", "gradio", "diffusers", "gcsfs",
           "array_record", "tensorflow"}


def _missing_distribution(distribution) -> bool:
    name = re.sub(r"[-_.]+", "_", distribution.metadata["Name"] or "").lower()
    return name in {module.lower() for module in MISSING}


class _Hiding:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()

    def find_distributions(self, *args, **kwargs):  # importlib.metadata's: what pip says is installed
        if not hasattr(self.finder, "find_distributions"):
            return iter(())
        return (d for d in self.finder.find_distributions(*args, **kwargs) if not _missing_distribution(d))

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [_Hiding(finder) for finder in sys.meta_path]
