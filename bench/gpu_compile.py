"""Compile for an NVIDIA H200 or H100, or a TPU chip (v5p, v6e, v5e; --card), on a machine without
one (XLA's deviceless compilation), and report what a GPU or TPU session would otherwise spend its
first minutes learning:

  kernels  whether our Pallas kernels compile to the card's code without spilling registers, for
           every tile setting of attention_speed.SWEEP: per kernel launch the grid, threads, shared
           memory (XLA's thunk list), and under jax 0.10 (whose dump has the PTX) the registers
           (ptxas -v) and the blocks that fit on one SM; on a TPU whether splash attention's
           forward and backward compile for the chip (Mosaic), and their memory plan;
  train    XLA's memory plan of one XL training step: arguments + outputs - aliased + temporaries,
           the peak the step needs on the card, per batch, remat policy and attention backend;
           --model=t2i: the text-to-image model with its frozen T5 encoder, which the step runs;
           on a TPU slice (--topology=2x2x1, --fsdp) sharded as training shards it, per chip;
  sample   sample_speed.py's programs at its settings: each stage's forward of the CFG batch, and
           the cascade's (noise, each stage's whole Euler solve, the uint8 finish): XLA's memory
           plan, and from XLA's thunk list what one call (one denoising step in a stage's solve)
           runs: kernels by kind, and host dispatches (a run of kernels XLA puts into a command
           buffer, a CUDA graph, is one), whether the step loop stays on the card (a loop of known
           trip count needs no host sync per step) and any callback to the host (GPU only). Its
           programs take the sampler's compiler options (for a GPU, matmuls on cuBLAS; XLA_FLAGS=
           --xla_gpu_enable_triton_gemm=true compiles XLA's Triton GEMMs instead).

train and sample also report each program's HBM traffic by kernel kind (bench/hlo_traffic.py: the
bytes its kernels read and write, from the optimized HLO) and the time it takes at the card's full
bandwidth, a floor under the program's time that FLOP counts miss; --top=N lists the N kernels
that move the most, with the jax operation each came from (where to look for a fusion to save).

Nothing runs: the numbers are the compiler's, not a measurement (bench/RESULTS.md keeps them apart).
The plan leaves out what comes at run time (cuDNN workspace, allocator fragmentation, the loader).

Setup, once: a venv that sees this machine's packages, plus jax's CUDA plugin of the same version
(about 5 GB; no GPU or driver needed):

    python -m venv --system-site-packages /tmp/cuda
    V=$(python -c 'import jax; print(jax.__version__)')
    /tmp/cuda/bin/pip install "jax-cuda12-plugin[with-cuda]==$V" "jax-cuda12-pjrt==$V"

    /tmp/cuda/bin/python bench/gpu_compile.py kernels
    /tmp/cuda/bin/python bench/gpu_compile.py train --batch=32 --remat=dots --attention=cudnn
    /tmp/cuda/bin/python bench/gpu_compile.py train --model=t2i --batch=32 --remat=dots
    /tmp/cuda/bin/python bench/gpu_compile.py sample --attention=cudnn,pallas_gpu

The CUDA plugin logs that it found no GPU; that is expected. Needs jax, flax, optax, numpy.

For a TPU, the libtpu that jax pins instead (about 140 MB; no TPU needed):

    python -m venv --system-site-packages /tmp/tpu
    /tmp/tpu/bin/pip install "jax[tpu]==$V"

    /tmp/tpu/bin/python bench/gpu_compile.py kernels --card=v5p --shapes=8x4096,32x1024,128x256
    /tmp/tpu/bin/python bench/gpu_compile.py train --card=v6e --batch=16 --remat=dots
    /tmp/tpu/bin/python bench/gpu_compile.py train --card=v5p --topology=2x2x1 --fsdp=4 --batch=128
    /tmp/tpu/bin/python bench/gpu_compile.py sample --card=v5p

libtpu logs that it could not determine the TPU accelerator type and worker hostnames; expected too.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import importlib.metadata
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# The CUDA plugin checks the driver's version when it loads; there is no driver here, and the check
# would leave the plugin unregistered (no "cuda" topology).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# libtpu lets one process at a time load it (a lockfile in /tmp), for the chips; compiling uses
# none, and two compiles at once, or one after a killed one, would fail on the lock.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from attention_speed import SWEEP  # noqa: E402
from harness import non_negative_int, positive_int  # noqa: E402
from hlo_traffic import joined_lines, kernel_traffic, parse_instruction, traffic_by_kind  # noqa: E402
from pixelflow_jax import CheckpointConfig, PixelFlowScheduler  # noqa: E402
from pixelflow_jax.config import COMPUTE_DTYPES, REMAT_POLICIES, matmul_precision  # noqa: E402
from pixelflow_jax.kernels.attention import compiling_for, dot_product_attention  # noqa: E402
from pixelflow_jax.model import PixelFlow  # noqa: E402
from pixelflow_jax.sampling.cascade import (CascadeSampler, SamplingOptions, class_conditioning,  # noqa: E402
                                            draw_noise_jit, finished_images_jit, stage_guidance)
from pixelflow_jax.scheduler import stage_resolutions  # noqa: E402
from pixelflow_jax.sharding import BATCH_AXES, batch_sharding, param_shardings  # noqa: E402
from pixelflow_jax.text.prompts import JOB_ENCODER_DTYPE  # noqa: E402
from pixelflow_jax.text.t5 import T5Config, T5Encoder  # noqa: E402
from pixelflow_jax.training.flow import StageTables  # noqa: E402
from pixelflow_jax.training.train_step import (StepConfig, TextConditioning, init_state, make_optimizer,  # noqa: E402
                                               make_train_step, state_shardings)
from sample_speed import BATCH, CFG, PRESETS, STEPS, forward_program  # noqa: E402

# XLA's description of each card (what a GPU's PJRT client reports about itself), for the compiler:
# SM count and limits, memory, compute capability. From NVIDIA's datasheets and CUDA's device query.
_CARD = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{name}"
"""
# HBM bytes/s: the GPUs' from NVIDIA's datasheets, the TPU chips' from Google Cloud's TPU pages.
BANDWIDTH = dict(h200=4_800_000_000_000, h100=3_352_320_000_000, v5p=2_765_000_000_000, v6e=1_638_000_000_000,
                 v5e=819_000_000_000)
CARDS = {
    "h200": _CARD.format(name="NVIDIA H200", bandwidth=BANDWIDTH["h200"], memory=150_754_820_096),
    "h100": _CARD.format(name="NVIDIA H100 80GB HBM3", bandwidth=BANDWIDTH["h100"], memory=84_929_347_584),
}
SM_REGISTERS, SM_SHARED_MEMORY, SM_MAX_BLOCKS, SM_MAX_THREADS = 65536, 233472, 32, 2048  # sm_90, per SM
# configs/t2i.py's text model at XL (cross-attention to flan-t5-xl's states) and train.max_text_tokens,
# written out: ml_collections, which the configs need, is not on the GPU machine.
TEXT_MODEL = dict(num_classes=0, cross_attention_dim=T5Config().d_model)
TEXT_TOKENS = 512
PTXAS_ARCH = "sm_90a"  # what XLA emits for compute capability 9.0
GPU_BACKENDS = ("auto", "cudnn", "pallas_gpu", "xla")
TPU_BACKENDS = ("auto", "splash", "xla")
# TPU chips, by the prefix of libtpu's topology names: the HBM a program may use per chip, in GB (10^9
# bytes, as peak_gb), as libtpu's compiler counts it: 95.74 / 31.25 / 15.75 GiB in its out-of-memory
# error, which fails the compile of a program that needs more (Google Cloud lists 95 / 32 / 16 GB);
# and the topology of one chip (v5p's slices are 3D, v5e's and v6e's 2D).
TPU_HBM_GB = dict(v5p=102.8, v6e=33.55, v5e=16.91)
ONE_CHIP = dict(v5p="1x1x1", v6e="1x1", v5e="1x1")
TPU_HOST_BOUNDS = (2, 2, 1)  # libtpu's default chips per host; a smaller topology must say its own
KERNEL_PREFIX = "pixelflow_"  # pallas_gpu_attention names its kernels so (name= of each pallas_call)


def platform(card: str) -> str:
    """'tpu' for a TPU chip, 'gpu' for a card (what attention.compiling_for takes)."""
    return "tpu" if card in TPU_HBM_GB else "gpu"


def card_mesh(card: str, axes: tuple[str, ...], topology: str | None = None,
              shape: tuple[int, ...] | None = None) -> jax.sharding.Mesh:
    """A mesh of compile-only devices of `card`: one (all axes of size 1), or for a TPU the chips of
    `topology` (e.g. 2x2x1) in `shape`."""
    if card in TPU_HBM_GB:
        devices = tpu_topology(card, topology or ONE_CHIP[card])
    else:
        try:
            devices = topologies.get_topology_desc(platform="cuda", target_config=CARDS[card], topology="1x1x1")
        except (NotImplementedError, RuntimeError) as error:
            raise SystemExit(f"error: cannot compile for a GPU here ({error}): this needs jax's CUDA plugin of jax "
                             f"{jax.__version__}, see the setup in bench/gpu_compile.py's docstring") from None
    return topologies.make_mesh(devices, shape or (1,) * len(axes), axes)


def tpu_topology(card: str, topology: str):
    """libtpu's compile-only devices of a `card` slice of `topology` chips (e.g. v5p 2x2x1)."""
    dims = [int(n) for n in topology.split("x")]
    host = tuple(min(n, bound) for n, bound in zip(dims + [1] * (3 - len(dims)), TPU_HOST_BOUNDS))
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=f"{card}:{topology}",
                                            chips_per_host_bounds=host)
    except RuntimeError as error:  # also jax's JaxRuntimeError, for a topology libtpu refuses
        raise SystemExit(f"error: cannot compile for a TPU {card} {topology} here ({str(error).splitlines()[0]}); "
                         "it needs libtpu, see the setup in bench/gpu_compile.py's docstring") from None


def chip_count(topology: str) -> int:
    return int(np.prod([int(n) for n in topology.split("x")]))


def compile_with_dump(fn, args, dump_dir: str):
    """fn jitted and compiled for the abstract args' device, XLA's files (thunks; PTX under jax
    0.10, not 0.11) in dump_dir. A program with a kernel that spills registers fails: spilling is
    what ptxas -v reads, and the one sign jax 0.11's dump leaves no PTX for."""
    options = {"xla_dump_to": dump_dir, "xla_gpu_fail_ptx_compilation_on_register_spilling": True}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


def kernel_launches(dump_dir: str) -> list[dict]:
    """Every kernel launch of the compiled program (XLA's thunk list)."""
    return [launch for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt"))
            for launch in parse_thunk_sequence(open(path).read())]


def parse_thunk_sequence(text: str) -> list[dict]:
    """XLA's thunk list -> each kernel launch's name, grid, threads and shared memory."""
    pattern = re.compile(r"(\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+)")
    return [dict(kernel=name, grid=[int(n) for n in grid.split(",")], threads=[int(n) for n in threads.split(",")],
                 shared_memory=int(shared))
            for name, grid, threads, shared in pattern.findall(text)]


def ptxas() -> str:
    import nvidia.cuda_nvcc  # installed with the CUDA plugin's [with-cuda] extra

    return os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")


def register_use(dump_dir: str) -> dict[str, dict]:
    """kernel name -> registers and spill bytes per thread, from ptxas -v over the dumped PTX."""
    use = {}
    for path in glob.glob(os.path.join(dump_dir, "*.ptx")):
        if ".entry" not in open(path).read():  # XLA dumps an empty PTX file for some modules
            continue
        report = subprocess.run([ptxas(), "-v", f"--gpu-name={PTXAS_ARCH}", path, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        use.update(parse_ptxas_report(report))
    return use


def parse_ptxas_report(report: str) -> dict[str, dict]:
    """ptxas -v's lines per entry function -> {name: registers, spill_stores, spill_loads}."""
    use = {}
    for block in report.split("Compiling entry function")[1:]:
        name = re.search(r"'(\S+)'", block).group(1)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        use[name] = dict(registers=int(registers.group(1)), spill_stores=int(spills.group(1)),
                         spill_loads=int(spills.group(2)))
    return use


def blocks_per_sm(threads: int, registers: int, shared_memory: int) -> int:
    """How many blocks of a kernel one SM holds at once (registers are allocated per warp in units
    of 256, shared memory with 1 KiB reserved per block, threads 2048 at most, in whole warps)."""
    warps = -(-threads // 32)
    warp_registers = -(-registers * 32 // 256) * 256
    by_registers = SM_REGISTERS // (warp_registers * warps)
    by_shared = SM_SHARED_MEMORY // (shared_memory + 1024)
    return min(by_registers, by_shared, SM_MAX_THREADS // (warps * 32), SM_MAX_BLOCKS)


def attention_operand(card: str, batch: int, length: int, heads: int, head_dim: int):
    """(a mesh of one `card`, the abstract bf16 (B, L, H, D) q, k or v on it)."""
    mesh = card_mesh(card, ("data",))
    on_card = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return mesh, jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16, sharding=on_card)


def attention_gradients(backend: str):
    """q, k, v -> the gradients of an attention's summed output: its forward and backward kernels."""

    def forward_backward(q, k, v):
        loss = lambda q, k, v: dot_product_attention(q, k, v, backend=backend).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return forward_backward


def compile_kernels(card: str, settings, batch: int, length: int, heads: int, head_dim: int) -> dict:
    """Forward+backward of pallas_gpu attention under `settings`, compiled for the card."""
    mesh, spec = attention_operand(card, batch, length, heads, head_dim)
    row = dict(card=card, shape=f"B{batch}x{length}", heads=heads, head_dim=head_dim,
               settings=dataclasses.asdict(settings))
    # The mesh tells Pallas which GPU it lowers for (jax 0.11 asks; 0.10 does not need it).
    with tempfile.TemporaryDirectory() as dump, settings.applied(), compiling_for("gpu"), jax.set_mesh(mesh):
        try:
            compile_with_dump(attention_gradients("pallas_gpu"), (spec, spec, spec), dump)
        except Exception as error:  # a setting that does not compile (or spills) is a result, not the end
            return {**row, "error": f"{type(error).__name__}: {str(error)[:2000]}"}
        use = register_use(dump)
        launches = kernel_launches(dump)
    launches = [launch for launch in launches if launch["kernel"].startswith(KERNEL_PREFIX)]  # not XLA's fusions
    for launch in launches:
        launch.update(use.get(launch["kernel"], {}))
        if "registers" in launch:
            launch["blocks_per_sm"] = blocks_per_sm(launch["threads"][0], launch["registers"], launch["shared_memory"])
    return {**row, "spills": False, "launches": launches}


def compile_splash(card: str, batch: int, length: int, heads: int, head_dim: int) -> dict:
    """Forward+backward of splash attention compiled for the TPU chip (Mosaic, not interpret mode):
    whether it compiles, its Mosaic kernels (tpu_custom_call in the optimized HLO), XLA's memory plan."""
    mesh, spec = attention_operand(card, batch, length, heads, head_dim)
    row = dict(card=card, shape=f"B{batch}x{length}", heads=heads, head_dim=head_dim, backend="splash")
    start = time.perf_counter()
    with compiling_for("tpu"), jax.set_mesh(mesh):
        try:
            compiled = jax.jit(attention_gradients("splash")).lower(spec, spec, spec).compile()
        except Exception as error:  # the kernel not compiling for the chip is the result
            return {**row, "error": f"{type(error).__name__}: {str(error)[:2000]}"}
    return {**row, "compile_s": round(time.perf_counter() - start, 1),
            "mosaic_kernels": compiled.as_text().count('custom_call_target="tpu_custom_call"'), **memory_plan(compiled)}


def compile_train_step(card: str, batch: int, remat: str, attention: str, dtype: str, model: str = "c2i",
                       text_tokens: int = TEXT_TOKENS, encoder_dtype: str = "float32", top: int = 0,
                       topology: str | None = None, fsdp: int = 1) -> dict:
    """XLA's memory plan of one XL/4 training step on the card (AdamW + EMA state, all four stages);
    for the text model (t2i) with the frozen T5 encoder that the step runs on its captions' tokens.
    On a TPU `topology` of several chips the step is sharded as training shards it (sharding.py:
    the global batch over ('data', 'fsdp'), parameters over 'fsdp'), and the plan is per chip."""
    base, resolution = PRESETS["xl"]
    cfg = dataclasses.replace(base, dtype=dtype, remat=remat, attention=attention,
                              **(TEXT_MODEL if model == "t2i" else {}))
    scheduler, step_cfg = PixelFlowScheduler(), StepConfig()
    tx = make_optimizer(step_cfg)
    tables = StageTables.from_scheduler(scheduler)  # concrete, on this host, before the card's mesh
    build = lambda: PixelFlow(cfg, rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(nnx.eval_shape(build))
    state = jax.eval_shape(lambda: init_state(build(), tx, seed=0))
    chips = chip_count(topology) if topology else 1
    mesh = card_mesh(card, BATCH_AXES, topology, (chips // fsdp, fsdp))
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state,
                         shardings)
    data = batch_sharding(mesh)
    images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.uint8, sharding=data)
    row = dict(card=card, model=model, preset="xl", batch=batch, remat=remat, attention=attention, dtype=dtype,
               **(dict(topology=topology or ONE_CHIP[card], fsdp=fsdp, chip_hbm_gb=TPU_HBM_GB[card])
                  if card in TPU_HBM_GB else {}))
    text = encoder_sharding = None
    if model == "t2i":
        text, encoder_params, encoder_sharding = text_encoder(mesh, text_tokens, encoder_dtype)
        tokens = jax.ShapeDtypeStruct((batch, text_tokens), jnp.int32, sharding=data)
        args = (state, images, (tokens, tokens), encoder_params)
        row.update(text_tokens=text_tokens, encoder_dtype=encoder_dtype,
                   encoder_gb=round(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(encoder_params)) / 1e9, 2))
    else:
        args = (state, images, jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data))
    start = time.perf_counter()
    with compiling_for(platform(card)):
        step = make_train_step(cfg, graphdef, tables, tx, step_cfg, resolution, scheduler.num_train_timesteps,
                               mesh, shardings, text=text, encoder_sharding=encoder_sharding)
        try:
            compiled = step.lower(*args).compile()
        except Exception as error:
            return {**row, "error": f"{type(error).__name__}: {str(error)[:2000]}"}
    plan = memory_plan(compiled)
    return {**row, "compile_s": round(time.perf_counter() - start, 1), "state_gb": plan["arguments_gb"],
            "temporaries_gb": plan["temporaries_gb"], "peak_gb": plan["peak_gb"], **traffic_report(compiled, card, top)}


def text_encoder(mesh, text_tokens: int, encoder_dtype: str):
    """The frozen flan-t5-xl encoder of a text training step, abstract: its TextConditioning, its
    parameters (an argument of the step, as train_text.load passes them) and their shardings."""
    t5 = T5Config(dtype=JOB_ENCODER_DTYPE, param_dtype=encoder_dtype)
    encoder = nnx.eval_shape(lambda: T5Encoder(t5, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    sharding = param_shardings(params, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, sharding)
    empty = np.zeros((text_tokens,), np.int32)  # the empty prompt's tokens: their values do not change the plan
    return TextConditioning(nnx.graphdef(encoder), empty, empty), params, sharding


def memory_plan(compiled) -> dict:
    """XLA's memory plan of a compiled program in GB; the peak is arguments + outputs - donated +
    temporaries."""
    memory = compiled.memory_analysis()
    gb = lambda n: round(n / 1e9, 2)
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    return dict(arguments_gb=gb(memory.argument_size_in_bytes), outputs_gb=gb(memory.output_size_in_bytes),
                temporaries_gb=gb(memory.temp_size_in_bytes), peak_gb=gb(peak))


def traffic_report(compiled, card: str, top: int = 0) -> dict:
    """HBM bytes per call by kernel kind (hlo_traffic, from the optimized HLO) in GB, the time they
    take at the card's full bandwidth (a floor under the call's time, set mostly by its elementwise
    fusions), and with `top` the kernels that move the most: [GB, kind, name, jax op]."""
    kernels = kernel_traffic(compiled.as_text())
    traffic = traffic_by_kind(kernels)
    report = dict(hbm_gb={kind: round(n / 1e9, 1) for kind, n in traffic.items()},
                  hbm_floor_ms=round(sum(traffic.values()) / BANDWIDTH[card] * 1e3, 1))
    if top:
        largest = sorted(kernels, key=lambda k: -k["bytes"])[:top]
        report["hbm_top"] = [[round(k["bytes"] / 1e9, 1), k["kind"], k["name"], k["op"]] for k in largest]
    return report


def parse_thunk_tree(text: str) -> list[dict]:
    """XLA's thunk list (after its thunk passes) -> a tree of {id, kind, name, blocks}: a while's
    blocks are its condition and body, a command buffer's (or another wrapper's) its thunks. The
    nesting is in the indentation; a while's "condition:" and "body:" lines are not aligned with it."""
    roots, stack = [], []  # stack: [indentation, thunk, the block its next children go into]
    for line in text.splitlines():
        label = re.fullmatch(r"\s*(\w+):\s*", line)
        if label:  # opens a block of the innermost control thunk (while, conditional)
            while stack[-1][1]["kind"] not in ("kWhile", "kConditional"):
                stack.pop()
            stack[-1][2] = label.group(1)
            continue
        thunk = re.match(r"(\s*)(\d+): (k\w+)\s+\[[^\]]*\]\s*(\S*)", line)
        if not thunk:
            continue
        indent, number, kind, name = thunk.groups()
        node = dict(id=int(number), kind=kind, name=name, blocks={})
        while stack and stack[-1][0] >= len(indent):
            stack.pop()
        if stack:
            stack[-1][1]["blocks"].setdefault(stack[-1][2], []).append(node)
        else:
            roots.append(node)
        stack.append([len(indent), node, "thunks"])
    return roots


def parse_trip_counts(thunk_metadata: str, hlo: str) -> dict[int, int]:
    """thunk id -> trip count of each while loop whose count XLA knows (its thunk metadata names
    the HLO while; the optimized HLO has the count in the while's backend config)."""
    names = dict(re.findall(r'profile_annotation: "([^"]+)"\s+thunk_id: (\d+)', thunk_metadata))
    counts = dict(re.findall(r'%(\S+) = .*\bwhile\(.*"known_trip_count":\{"n":"(\d+)"\}', hlo))
    return {int(thunk): int(counts[name]) for name, thunk in names.items() if name in counts}


def thunk_kind(thunk: dict) -> str:
    """What a leaf thunk runs: a matmul, cuDNN (attention), our Pallas kernel, a copy or memset, a
    fusion, or no kernel: a wait for work that an async start put on another stream (jax 0.11)."""
    if thunk["kind"] == "kAsyncDone":
        return "stream_wait"
    if thunk["kind"] == "kCuDnn":
        return "cudnn"
    if thunk["name"].startswith(KERNEL_PREFIX):
        return "pallas"
    if "gemm" in thunk["name"] or thunk["kind"] in ("kGemm", "kCublasLtMatmul"):
        return "gemm"
    if "Copy" in thunk["kind"] or thunk["kind"].startswith("kMem"):
        return "copy"
    return "fusion"


def launch_counts(thunks: list[dict], trips: dict[int, int]) -> collections.Counter:
    """What one run of `thunks` runs on the card: kernels by thunk_kind, and "dispatches", the
    thunks the host issues (a command buffer is one, however many kernels it holds; a loop's body
    is issued once per trip). A while of unknown trip count counts once, with "unknown_trips"."""
    counts = collections.Counter()
    for thunk in thunks:
        if thunk["kind"] == "kWhile":
            inner = launch_counts(thunk["blocks"].get("body", []), trips)
            if thunk["id"] not in trips:  # its condition is read back by the host every trip
                inner += launch_counts(thunk["blocks"].get("condition", []), trips)
                inner["unknown_trips"] += 1
            for key, n in inner.items():
                counts[key] += n * (1 if key == "unknown_trips" else trips.get(thunk["id"], 1))
        elif thunk["blocks"]:
            inner = launch_counts([child for block in thunk["blocks"].values() for child in block], trips)
            if thunk["kind"] == "kCommandBuffer":
                inner["dispatches"] = 1
            counts += inner
        else:
            counts[thunk_kind(thunk)] += 1
            counts["dispatches"] += 1
    return counts


def read_dump(dump_dir: str, suffix: str) -> str:
    """The one file of the compiled module's dump that ends with `suffix`."""
    paths = glob.glob(os.path.join(dump_dir, f"*{suffix}"))
    if len(paths) != 1:
        raise FileNotFoundError(f"expected one *{suffix} in XLA's dump, found {len(paths)}")
    return open(paths[0]).read()


def host_callbacks(hlo: str) -> int:
    """The instructions of an HLO module that wait on the host: send, recv, infeed, outfeed, and
    custom calls of a Python callback (jax's pure_callback, io_callback, debug.print); each once,
    not each line that names a callback (its op_name and source file do too)."""
    count = 0
    for instruction in filter(None, map(parse_instruction, joined_lines(hlo))):
        target = re.search(r'custom_call_target="([^"]+)"', instruction["attributes"])
        count += instruction["op"] in ("send", "recv", "infeed", "outfeed") or bool(target and "callback" in target[1])
    return count


def program_report(dump_dir: str, steps: int | None) -> dict:
    """From XLA's dump of one compiled program: launches per call, and for a stage's solve per
    step of its Euler loop (the top-level while of `steps` trips) and whether that loop stays on
    the card; host callbacks (send, recv, infeed, outfeed, python callbacks)."""
    try:
        thunks = read_dump(dump_dir, "thunk_sequence_after_thunk_passes.txt")
    except FileNotFoundError:  # XLA writes it only where its passes changed the list
        thunks = read_dump(dump_dir, "thunk_sequence.txt")
    roots = parse_thunk_tree(thunks)
    hlo = read_dump(dump_dir, "gpu_after_optimizations.txt")
    trips = parse_trip_counts(read_dump(dump_dir, "thunk_metadata.txt"), hlo)
    report = dict(per_call=dict(launch_counts(roots, trips)), host_callbacks=host_callbacks(hlo))
    if steps is not None:
        loops = [thunk for thunk in roots if thunk["kind"] == "kWhile" and trips.get(thunk["id"]) == steps]
        report["step_loop_on_card"] = len(loops) == 1
        if loops:
            report["per_step"] = dict(launch_counts(loops[0]["blocks"].get("body", []), trips))
    return report


def compile_sampling(card: str, preset: str, batch: int, steps: int, cfg_scale: float, attention: str, dtype: str,
                     top: int = 0):
    """sample_speed.py's programs for a preset's model (XL/4: the one it times), compiled for the
    card: each stage's forward of the CFG batch (its per-stage times), then those of the cascade's
    generate: the noise, each stage's program as CascadeSampler runs it (renoise + the whole Euler
    solve), the finish. Yields a row per program as it compiles."""
    base, resolution = PRESETS[preset]
    cfg = dataclasses.replace(base, dtype=dtype, attention=attention)
    ckpt = CheckpointConfig(model=cfg, resolution=resolution)
    sampler = CascadeSampler(nnx.eval_shape(lambda: PixelFlow(cfg, rngs=nnx.Rngs(0))), ckpt)
    mesh = card_mesh(card, ("data",))
    on_card = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=on_card)
    abstract = lambda tree: jax.tree.map(lambda a: spec(a.shape, a.dtype), tree)  # numpy or abstract leaves
    state = abstract(sampler.state)
    sizes = stage_resolutions(resolution, ckpt.num_stages)
    channels = cfg.in_channels
    row = dict(card=card, preset=preset, attention=attention, dtype=dtype, batch=batch, steps_per_stage=steps,
               cfg=cfg_scale)
    options = SamplingOptions.create(ckpt.num_stages, steps, cfg_scale=cfg_scale)

    def compiled(program: str, fn, args, stage=None, model_batch=None, steps=None, **static) -> dict:
        info = dict(program=program, **({} if stage is None else dict(stage=stage, pixels=sizes[stage])),
                    **({} if model_batch is None else dict(model_batch=model_batch)))
        start = time.perf_counter()
        with (tempfile.TemporaryDirectory() as dump, compiling_for(platform(card)), matmul_precision(dtype),
              jax.set_mesh(mesh)):
            try:
                executable = fn.lower(*args, **static).compile(compiler_options={"xla_dump_to": dump})
            except Exception as error:
                return {**row, **info, "error": f"{type(error).__name__}: {str(error)[:2000]}"}
            result = {**row, **info, "compile_s": round(time.perf_counter() - start, 1), **memory_plan(executable),
                      **traffic_report(executable, card, top)}
            if platform(card) == "tpu":  # the launch counts read a GPU's thunk list
                return result
            try:
                return {**result, **program_report(dump, steps)}
            except FileNotFoundError as error:  # another jax's dump: the plan still counts
                return {**result, "report_error": f"{type(error).__name__}: {error}"}

    with compiling_for(platform(card)):  # the programs take their compiler options for the card, as on it
        forward = forward_program(sampler.graphdef)
    for stage, size in enumerate(sizes):
        args = (state, spec((2 * batch, size, size, channels)), spec((2 * batch,)), spec((2 * batch,), jnp.int32))
        yield compiled("forward", forward, args, stage=stage, model_batch=2 * batch)
    key = spec((), jax.random.key(0).dtype)
    static = dict(resolution=resolution, num_stages=ckpt.num_stages, channels=channels, gamma=sampler.scheduler.gamma)
    yield compiled("noise", draw_noise_jit, (key, spec((batch,), jnp.int32)), **static)
    guidance = stage_guidance(cfg_scale, ckpt.num_stages, class_conditional=True)
    cond, uncond = class_conditioning(np.arange(batch) % cfg.num_classes, cfg.num_classes)
    x = spec((batch, sizes[0], sizes[0], channels))
    for stage, size in enumerate(sizes):
        noise = None if stage == 0 else spec((batch, size, size, channels))
        with compiling_for(platform(card)):
            program, args = sampler.stage_call(stage, x, noise, cond, uncond, guidance[stage], options)
        # guidance 1 (stage 0 of the release's schedule) runs the model on the conditional half only
        yield compiled("stage", program, (state, *abstract(args[1:])), stage=stage, steps=steps,
                       model_batch=batch if guidance[stage] == 1.0 else 2 * batch)
        x = spec((batch, size, size, channels))
    yield compiled("finish", finished_images_jit, (x,))


def one_of(choices):
    """An argparse type: one of `choices`."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def comma_separated(parse_one):
    """An argparse type: a comma-separated list, each item parsed (and refused) by parse_one."""
    return lambda text: [parse_one(item) for item in text.split(",")]


def batch_by_length(text: str) -> tuple[int, int]:
    """An argparse type: an attention shape BxL (batch x sequence length), both whole numbers >= 1."""
    batch, _, length = text.partition("x")
    try:
        return positive_int(batch), positive_int(length)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be batch x length like 8x4096, got {text!r}") from None


def tpu_topology_name(text: str) -> str:
    """An argparse type: a TPU slice's chips per dimension, 2 or 3 of them (2x2, 2x2x1)."""
    if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){1,2}", text):
        raise argparse.ArgumentTypeError(f"must be chips per dimension like 2x2 or 2x2x1, got {text!r}")
    return text


# The options that apply to only some subcommands (the rest apply to all or are checked with the chips').
USED_BY = dict(shapes=("kernels",), heads=("kernels",), head_dim=("kernels",), preset=("sample",),
               steps=("sample",), cfg=("sample",), remat=("train",), batch=("train", "sample"),
               attention=("train", "sample"), dtype=("train", "sample"), top=("train", "sample"))
DEFAULTS = dict(shapes=[(8, 4096), (32, 1024)], heads=16, head_dim=72, preset="xl", steps=STEPS, cfg=CFG,
                remat=["dots"], dtype="bfloat16", top=0)


def check_options_apply(parser: argparse.ArgumentParser, args) -> None:
    """An option the subcommand does not read is a usage error (`train --preset=tiny` compiled XL),
    then the defaults of those not given (DEFAULTS) are filled in."""
    for name, subcommands in USED_BY.items():
        if getattr(args, name) is not None and args.what not in subcommands:
            parser.error(f"argument --{name}: for {' or '.join(subcommands)} only, not {args.what}")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_chip_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors, before anything compiles: a TPU's options with a GPU, a backend that does not
    run on the card, a mesh or batch that does not divide over the chips."""
    on_tpu = platform(args.card) == "tpu"
    backends = TPU_BACKENDS if on_tpu else GPU_BACKENDS
    for backend in args.attention or []:
        if backend not in backends:
            parser.error(f"argument --attention: {backend} does not run on {args.card}; one of {', '.join(backends)}")
    if not on_tpu and (args.topology or args.fsdp != 1):
        parser.error(f"argument --{'topology' if args.topology else 'fsdp'}: for a TPU card only, not {args.card}")
    if (args.topology or args.fsdp != 1) and args.what != "train":
        parser.error(f"argument --{'topology' if args.topology else 'fsdp'}: for train only, not {args.what}")
    chips = chip_count(args.topology) if args.topology else 1
    if chips % args.fsdp:
        parser.error(f"argument --fsdp: {args.fsdp} does not divide the {chips} chips of --topology={args.topology}")
    for batch in (args.batch or [32]) if args.what == "train" else []:
        if batch % chips:
            parser.error(f"argument --batch: {batch} does not split over the {chips} chips of --topology="
                         f"{args.topology}; use a multiple of {chips}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("kernels", "train", "sample"))
    parser.add_argument("--card", choices=sorted(CARDS) + sorted(TPU_HBM_GB), default="h200",
                        help="a GPU, or a TPU chip (needs libtpu, see the setup above)")
    parser.add_argument("--topology", type=tpu_topology_name,
                        help="train on a TPU: the slice's chips, e.g. 2x2x1 (v5p) or 2x2 (v5e, v6e); default one chip")
    parser.add_argument("--fsdp", type=positive_int, default=1,
                        help="train on a TPU --topology: the mesh's 'fsdp' axis (sharding.py), dividing its chips")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="sample: the model (default xl; train always compiles XL)")
    parser.add_argument("--shapes", type=comma_separated(batch_by_length),
                        help="kernels: comma-separated BxL (default 8x4096,32x1024)")
    parser.add_argument("--heads", type=positive_int, help="kernels: attention heads (default 16)")
    parser.add_argument("--head_dim", type=positive_int, help="kernels: channels per head (default 72)")
    parser.add_argument("--batch", type=comma_separated(positive_int),
                        help=f"comma-separated; train: global batches (default 32); sample: images per batch (default "
                             f"{BATCH}, the CFG batch is twice this)")
    parser.add_argument("--steps", type=positive_int, help=f"sample: Euler steps per stage (default {STEPS})")
    parser.add_argument("--cfg", type=float, help=f"sample: the CFG scale (default {CFG}; 1: no guidance)")
    parser.add_argument("--remat", type=comma_separated(one_of(REMAT_POLICIES)),
                        help=f"train: comma-separated, of {REMAT_POLICIES} (default dots)")
    parser.add_argument("--attention", type=comma_separated(one_of(tuple(dict.fromkeys(GPU_BACKENDS + TPU_BACKENDS)))),
                        help=f"comma-separated; on a GPU of {GPU_BACKENDS} (default: train cudnn, sample "
                             f"cudnn,pallas_gpu), on a TPU of {TPU_BACKENDS} (default splash)")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, help="train, sample: the compute dtype (default bfloat16)")
    parser.add_argument("--top", type=non_negative_int,
                        help="train, sample: also list the N kernels that move the most HBM bytes (hbm_top)")
    parser.add_argument("--model", choices=("c2i", "t2i"), default="c2i",
                        help="train: class-conditional, or text-to-image (configs/t2i.py's XL, with its T5 encoder)")
    parser.add_argument("--text_tokens", type=positive_int,
                        help=f"train --model=t2i: caption tokens (default {TEXT_TOKENS}, train.max_text_tokens)")
    parser.add_argument("--encoder_dtype", choices=("float32", "bfloat16"),
                        help="train --model=t2i: the T5 encoder's parameters (default float32, "
                             "train.text_encoder_dtype)")
    args = parser.parse_args()
    if args.model == "t2i" and args.what != "train":
        parser.error(f"argument --model: t2i is for train only, not {args.what}")
    for name in ("text_tokens", "encoder_dtype"):
        if getattr(args, name) is not None and args.model != "t2i":
            parser.error(f"argument --{name}: for train --model=t2i only")
    check_options_apply(parser, args)
    check_chip_arguments(parser, args)
    try:  # the sampler's own checks, before minutes of compiling
        SamplingOptions.create(PixelFlowScheduler().num_stages, args.steps, cfg_scale=args.cfg)
    except ValueError as error:
        parser.error(f"argument --cfg: {error}")

    on_tpu = platform(args.card) == "tpu"
    versions = dict(jax=jax.__version__, **({"libtpu": importlib.metadata.version("libtpu")} if on_tpu else {}))
    print(json.dumps(dict(**versions, card=args.card)), flush=True)
    if args.what == "kernels" and on_tpu:  # splash's blocks follow the lengths: no tile settings to sweep
        for batch, length in args.shapes:
            print(json.dumps(compile_splash(args.card, batch, length, args.heads, args.head_dim)), flush=True)
        return
    if args.what == "kernels":
        for settings, (batch, length) in itertools.product(SWEEP, args.shapes):
            report = compile_kernels(args.card, settings, batch, length, args.heads, args.head_dim)
            print(json.dumps(report), flush=True)
        return
    if args.what == "sample":
        default = ["splash"] if on_tpu else ["cudnn", "pallas_gpu"]
        for batch, attention in itertools.product(args.batch or [BATCH], args.attention or default):
            for row in compile_sampling(args.card, args.preset, batch, args.steps, args.cfg, attention, args.dtype,
                                        args.top):
                print(json.dumps(row), flush=True)
        return
    default = ["splash"] if on_tpu else ["cudnn"]
    for batch, remat, attention in itertools.product(args.batch or [32], args.remat, args.attention or default):
        text = dict(text_tokens=args.text_tokens or TEXT_TOKENS, encoder_dtype=args.encoder_dtype or "float32")
        print(json.dumps(compile_train_step(args.card, batch, remat, attention, args.dtype, args.model,
                                            **(text if args.model == "t2i" else {}), top=args.top,
                                            topology=args.topology, fsdp=args.fsdp)), flush=True)


if __name__ == "__main__":
    main()
