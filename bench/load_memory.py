"""Peak host memory of loading a PixelFlow-XL/4 training run's EMA weights vs its whole train state (CPU).

    python bench/load_memory.py                     # builds a temp run in /tmp (~10.8 GB), measures, deletes it
    python bench/load_memory.py --workdir=/tmp/xl --keep    # keep the run to measure again (reused if present)

Writes a training run of configs/c2i.py's default model (677M parameters, random init) the way
train.py does (run_config.json by train.check_run_config; checkpoints/1/ by checkpointing.checkpoint_manager +
checkpointing.save), then measures each load in a fresh process, on one CPU device:
  ema         api.read_checkpoint(api.resolve_checkpoint(RUN), 'ema'): orbax partial restore of the EMA only
  load_model  pixelflow_jax.load_model(RUN): the same plus the NNX model around it
  state       checkpointing.restore: the whole train state (params, EMA, AdamW moments, scalars), as a resume does
and reports max RSS (getrusage), the RSS after `import jax` and just before the load, and the bytes restored.
A watchdog kills any process whose RSS nears the machine's available memory (and says so) instead of
letting it take the machine down. The checkpoint files are in the page cache after the build, so the
load times are warm-cache times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GiB = 2**30
STEP = 1
MEASURES = ("ema", "load_model", "state")


def rss_bytes(pid: str | int = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def c2i_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("c2i", os.path.join(ROOT, "configs", "c2i.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def create_state(model_cfg):
    from flax import nnx

    from pixelflow_jax.model import PixelFlow
    from pixelflow_jax.training.train_step import StepConfig, init_state, make_optimizer

    tx = make_optimizer(StepConfig())
    return lambda: init_state(PixelFlow(model_cfg, rngs=nnx.Rngs(0)), tx, 0)


def build(workdir: str) -> dict:
    """The run's config and one checkpoint, as train.py writes them (skipped if a complete step exists)."""
    import jax

    from pixelflow_jax.checkpoints.run_checkpoint import complete_steps, is_run
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.training import checkpointing, train

    if is_run(workdir) and complete_steps(workdir):
        return {"built": False}
    config = c2i_config()
    model_cfg = ModelConfig.from_mapping(config.model)
    train.check_run_config(workdir, model_cfg, config)
    start = time.perf_counter()
    state = jax.jit(create_state(model_cfg))()
    manager = checkpointing.checkpoint_manager(workdir, keep=1)
    checkpointing.save(manager, STEP, state)
    manager.wait_until_finished()
    manager.close()
    return {"built": True, "seconds": time.perf_counter() - start,
            "params": sum(x.size for x in jax.tree.leaves(state["params"])),
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure(what: str, workdir: str) -> dict:
    import jax

    after_import = rss_bytes()
    from flax import nnx

    from pixelflow_jax import api, load_model
    from pixelflow_jax.checkpoints.run_checkpoint import latest_step, run_checkpoint_config
    from pixelflow_jax.training import checkpointing

    jax.devices()
    before = rss_bytes()
    start = time.perf_counter()
    if what == "ema":
        tree = api.read_checkpoint(api.resolve_checkpoint(workdir), "ema")[1]
    elif what == "load_model":
        tree = nnx.state(load_model(workdir)[0], nnx.Param)
    elif what == "state":
        abstract = jax.eval_shape(create_state(run_checkpoint_config(workdir).model))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        manager = checkpointing.checkpoint_manager(workdir, keep=1)
        on_device = jax.tree.map(lambda _: device, abstract)
        tree = checkpointing.restore(manager, latest_step(workdir).step, abstract, on_device)
        manager.close()
    else:
        raise ValueError(what)
    jax.block_until_ready(tree)
    leaves = jax.tree.leaves(tree)
    return {"seconds": time.perf_counter() - start, "restored": sum(x.nbytes for x in leaves),
            "count": sum(x.size for x in leaves), "after_import_jax": after_import, "before_load": before,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_child(args: list[str], limit: int) -> dict:
    """Runs this script with `args` in a fresh process; kills it if its RSS passes `limit`."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdout=out, stderr=err)
        seen = 0
        while proc.poll() is None:
            try:
                seen = max(seen, rss_bytes(proc.pid))
            except (OSError, StopIteration):
                pass
            if seen > limit:
                proc.kill()
                proc.wait()
                return {"error": f"killed: RSS passed {limit / GiB:.1f} GiB (the memory available)"}
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            return {"error": f"exit {proc.returncode}: {err.read().strip().splitlines()[-1:]}"}
        return json.loads(out.read().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="", help="training run to build/reuse (default: a temp folder in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the default temp run (a given --workdir is kept)")
    parser.add_argument("--measure", choices=("build",) + MEASURES, help=argparse.SUPPRESS)  # child processes
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(build(args.workdir) if args.measure == "build" else measure(args.measure, args.workdir)))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="pixelflow_load_memory_", dir="/tmp")
    headroom = GiB  # left to the rest of the machine
    try:
        start = time.perf_counter()
        built = run_child(["--measure=build", f"--workdir={workdir}"], available_bytes() - headroom)
        if "error" in built:
            sys.exit(f"building the run failed: {built['error']}")
        print(f"run {workdir}: " + (f"built in {built['seconds']:.0f} s, {built['params']:,} parameters, "
                                    f"max RSS {built['max_rss'] / GiB:.2f} GiB"
                                    if built["built"] else "reused"), flush=True)
        rows = {}
        for what in MEASURES:
            rows[what] = run_child([f"--measure={what}", f"--workdir={workdir}"], available_bytes() - headroom)
            print(what, rows[what], flush=True)
        print("\n| load | restored | elements | RSS after import jax | RSS before load | max RSS | max RSS - before "
              "| time |")
        print("|---|---|---|---|---|---|---|---|")
        for what, r in rows.items():
            if "error" in r:
                print(f"| {what} | {r['error']} | | | | | | |")
                continue
            gb = lambda key: f"{r[key] / GiB:.2f} GiB"  # noqa: E731
            print(f"| {what} | {gb('restored')} | {r['count']:,} | {gb('after_import_jax')} | {gb('before_load')} | "
                  f"{gb('max_rss')} | {(r['max_rss'] - r['before_load']) / GiB:.2f} GiB | {r['seconds']:.1f} s |")
        print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
