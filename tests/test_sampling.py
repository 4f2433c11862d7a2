"""The cascade sampler against the release's recorded sampling runs, and its noise."""

import contextlib
import re

import jax
import numpy as np
import pytest
from PIL import Image

from pixelflow_jax import load_model
from pixelflow_jax.sampling.cascade import (CascadeSampler, SamplingOptions, block_noise, block_noise_factor,
                                            class_conditioning, stage_guidance)
from test_model_parity import relative_error


def nhwc(a):
    return a.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny(converted):
    model, config = load_model(converted["c2i_tiny"])
    return model, config, CascadeSampler(model, config)


def replay(sampler, g, prefix, options, batch):
    cond, uncond = class_conditioning(g[f"{prefix}_labels"], 1000)
    blocks = [nhwc(g[f"{prefix}_block_noise_stage{s}"])[:batch] for s in (1, 2, 3)]
    return np.asarray(sampler.sample(nhwc(g[f"{prefix}_init_noise"]), blocks, cond, uncond, options))


@pytest.mark.parametrize("case", [0, 1])
def test_euler_replay_matches_release(tiny, golden, case):
    g = golden["c2i_tiny"]
    options = SamplingOptions.create(4, g[f"sample{case}_steps"].tolist(), cfg_scale=float(g[f"sample{case}_cfg"]),
                                     shift=float(g[f"sample{case}_shift"]))
    latents = replay(tiny[2], g, f"sample{case}", options, batch=2)
    error = relative_error(latents, nhwc(g[f"sample{case}_final_latents"]))
    print(f"euler sample{case}: relative error {error:.2e}")
    assert error <= 1e-4
    images = np.clip(latents / 2 + 0.5, 0, 1)
    assert relative_error(images, g[f"sample{case}_out"]) <= 1e-4


@pytest.mark.parametrize("rtol,atol,bound", [(1e-3, 1e-6, 1e-2), (1e-7, 1e-9, 5e-3)])
def test_dopri5_replay_matches_release(tiny, golden, rtol, atol, bound):
    # The release duplicates the batch for guidance and draws block noise for both halves; only the
    # first half reaches its output, so the first half of each draw is what this batch needs.
    g = golden["c2i_tiny"]
    options = SamplingOptions.create(4, 10, cfg_scale=float(g["dopri5_cfg"]), solver="dopri5", rtol=rtol, atol=atol)
    images = np.clip(replay(tiny[2], g, "dopri5", options, batch=2) / 2 + 0.5, 0, 1)
    error = relative_error(images, g["dopri5_out"])
    print(f"dopri5 rtol {rtol}: relative error {error:.2e}")
    assert error <= bound


def test_block_noise_covariance_and_layout():
    gamma = -1.0 / 3.0
    key = jax.random.key(3)
    noise = np.asarray(block_noise(key, (512, 512, 2), gamma))  # 131072 blocks
    blocks = noise.reshape(256, 2, 256, 2, 2).transpose(0, 2, 4, 1, 3).reshape(-1, 4)  # (p, q) order
    sigma = (1 - gamma) * np.eye(4) + gamma * np.ones((4, 4)) + 1e-6 * np.eye(4)
    np.testing.assert_allclose(np.cov(blocks, rowvar=False), sigma, atol=0.02)
    np.testing.assert_allclose(blocks.mean(0), 0, atol=0.01)
    # The factor itself, to float32's precision: the release's Sigma, its 1e-6 jitter included (a sample's spread
    # above cannot tell 1e-3 from it).
    np.testing.assert_allclose(block_noise_factor(gamma) @ block_noise_factor(gamma).T, sigma, atol=1e-6)
    # Entry (p, q) of block (h, w) sits at pixel (2h + p, 2w + q): check one block against L z.
    z = np.asarray(jax.random.normal(key, (256, 256, 2, 4)))
    expected = block_noise_factor(gamma) @ z[5, 7, 1]
    np.testing.assert_allclose(noise[10:12, 14:16, 1].reshape(4), expected, rtol=1e-5, atol=1e-6)


def test_each_image_draws_its_own_noise_at_every_stage():
    """fold_in(key, image id): one id's noise whatever its row, and another id's differs at every stage."""
    from pixelflow_jax.sampling.cascade import draw_noise_jit

    initial, blocks = draw_noise_jit(jax.random.key(3), jax.numpy.array([0, 1, 0]), 32, 4, 3, 0.3)
    alone, alone_blocks = draw_noise_jit(jax.random.key(3), jax.numpy.array([1]), 32, 4, 3, 0.3)
    for stage, noise in enumerate([initial, *blocks]):
        noise = np.asarray(noise)
        np.testing.assert_array_equal(noise[0], noise[2])
        assert np.abs(noise[0] - noise[1]).min(axis=-1).mean() > 0.1, stage
        np.testing.assert_array_equal(noise[1], np.asarray([alone, *alone_blocks][stage])[0])


def test_each_stage_draws_its_block_noise_from_a_key_of_its_own():
    """With one key for every stage, a smaller stage's block noise is a copy of the larger one's
    first values (jax's partitionable random bits): each of its values recurs in the next stage's."""
    from pixelflow_jax.sampling.cascade import draw_noise_jit
    from pixelflow_jax.scheduler import DEFAULT_GAMMA

    initial, blocks = draw_noise_jit(jax.random.key(3), jax.numpy.array([0]), 64, 4, 3, DEFAULT_GAMMA)
    stages = [np.asarray(noise)[0].ravel() for noise in (initial, *blocks)]
    for stage, (smaller, larger) in enumerate(zip(stages, stages[1:])):
        assert np.isin(smaller, larger).mean() < 0.01, stage


def test_an_images_noise_is_the_one_its_seed_and_id_name_and_the_cascade_samples_from_it(tiny):
    """Image i of seed s: fold_in(key(s), i) split into one key per stage, the first drawing stage 0's
    N(0, I) and key k stage k's block noise (README, Resuming), recomputed here for one image. Any
    other key (another key of the split, or another split) keeps every image's noise its own and
    independent of its batch, which the tests above check, but resumes and replays no earlier job."""
    from pixelflow_jax.sampling.cascade import draw_noise_jit, to_uint8
    from pixelflow_jax.scheduler import stage_resolutions

    model, config, sampler = tiny
    seed, image_id, stages, gamma = 3, 5, config.num_stages, sampler.scheduler.gamma
    sizes = stage_resolutions(config.resolution, stages)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), image_id), stages)
    initial = jax.random.normal(keys[0], (1, sizes[0], sizes[0], 3))
    blocks = [block_noise(keys[s], (sizes[s], sizes[s], 3), gamma)[None] for s in range(1, stages)]
    drawn = draw_noise_jit(jax.random.key(seed), jax.numpy.array([image_id]), config.resolution, stages, 3, gamma)
    for stage, (mine, theirs) in enumerate(zip([initial, *blocks], [drawn[0], *drawn[1]])):
        np.testing.assert_allclose(np.asarray(theirs), np.asarray(mine), rtol=1e-6, atol=1e-6, err_msg=f"stage {stage}")

    kwargs = dict(steps_per_stage=2, cfg_scale=2.0)  # as test_generate_is_deterministic_per_image's batch of 1
    cond, uncond = class_conditioning([4], 1000)
    replayed = to_uint8(sampler.sample(initial, blocks, cond, uncond, SamplingOptions.create(stages, 2, cfg_scale=2.0)))
    generated = sampler.generate([4], seed=seed, image_ids=[image_id], **kwargs)
    assert np.abs(generated.astype(int) - np.asarray(replayed).astype(int)).max() <= 1


def test_text_guidance_pairs_each_image_with_the_negative_prompts_states_and_mask():
    from pixelflow_jax.sampling.cascade import text_conditioning

    rng = np.random.default_rng(0)
    states, mask = rng.normal(size=(3, 5, 8)), np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    negative = (rng.normal(size=(1, 5, 8)), np.array([[1, 1, 1, 0, 0]]))
    cond, uncond = text_conditioning(states, mask, negative)
    np.testing.assert_array_equal(cond["encoder_hidden_states"], states)
    np.testing.assert_array_equal(cond["encoder_attention_mask"], mask)
    np.testing.assert_array_equal(uncond["encoder_hidden_states"], np.repeat(negative[0], 3, axis=0))
    np.testing.assert_array_equal(uncond["encoder_attention_mask"], np.repeat(negative[1], 3, axis=0))


def test_final_images_round_to_the_nearest_level_as_the_release_does():
    from pixelflow_jax.sampling.cascade import to_uint8

    levels = np.array([0.4, 0.6, 127.4, 127.6, 254.6, -3.0, 300.0])  # round(255 * clip(x / 2 + 0.5, 0, 1))
    latents = (levels / 255 - 0.5) * 2
    expected = np.round(255 * np.clip(latents / 2 + 0.5, 0, 1))
    np.testing.assert_array_equal(np.asarray(to_uint8(jax.numpy.asarray(latents, jax.numpy.float32))), expected)
    assert list(expected) == [0, 1, 127, 128, 255, 0, 255]


def test_stage_guidance_follows_the_release():
    assert stage_guidance(2.4, 4, True) == pytest.approx([1.0, 1 + 1.4 / 6, 1 + 1.4 * 2 / 3, 2.4])
    assert stage_guidance(4.0, 4, False) == [4.0] * 4
    # Other stage counts follow the same curve (the release's four weights joined by straight lines).
    assert stage_guidance(6.0, 2, True) == pytest.approx([1.0, 6.0])
    assert stage_guidance(6.0, 3, True) == pytest.approx([1.0, 1 + 5 * (1 / 6 + 0.5 * (2 / 3 - 1 / 6)), 6.0])
    assert stage_guidance(6.0, 1, True) == [6.0]


def test_generate_is_deterministic_per_image(tiny):
    model, config, sampler = tiny
    kwargs = dict(steps_per_stage=2, cfg_scale=2.0, seed=5)
    both = CascadeSampler(model, config).generate([3, 4], **kwargs)  # a fresh sampler, as the one reused
    assert both.shape == (2, 64, 64, 3) and both.dtype == np.uint8
    np.testing.assert_array_equal(sampler.generate([3, 4], **kwargs), both)
    # An image depends on (seed, id, label) only, not on what else is in its batch.
    alone = sampler.generate([4], image_ids=[1], **kwargs)
    assert np.abs(alone[0].astype(int) - both[1].astype(int)).max() <= 1
    other_seed = sampler.generate([3, 4], steps_per_stage=2, cfg_scale=2.0, seed=6)
    assert np.abs(other_seed.astype(int) - both.astype(int)).mean() > 5


@pytest.mark.parametrize("setting", [jax.threefry_partitionable(False), jax.default_prng_impl("rbg")],
                         ids=["JAX_THREEFRY_PARTITIONABLE=0", "JAX_DEFAULT_PRNG_IMPL=rbg"])
def test_a_seed_draws_the_same_images_whatever_jaxs_random_number_settings(tiny, setting):
    """Either jax setting in a user's environment (the first is jax's own advice for keeping the random
    numbers of versions before 0.5) made every image of a seed another, and nothing recorded with the
    images said so: a job rerun there mixed two sets of noise in one samples.npz."""
    model, config, sampler = tiny
    kwargs = dict(steps_per_stage=1, cfg_scale=2.0, seed=3)
    expected = sampler.generate([1, 2], **kwargs)
    with setting:
        np.testing.assert_array_equal(sampler.generate([1, 2], **kwargs), expected)


def test_a_bfloat16_image_depends_on_its_batch_by_a_few_levels_as_the_readme_says(converted):
    """In bfloat16 (the XL config's default, which the README's FID job samples with) a batch of
    another shape rounds the model's matmuls otherwise: an image moves by a few levels, not float32's
    one (a job resumed with another batch size or device count; a rerun keeps the job's shape)."""
    model, config = load_model(converted["c2i_tiny"], dtype="bfloat16")
    sampler = CascadeSampler(model, config)
    kwargs = dict(steps_per_stage=2, cfg_scale=2.4, seed=0)
    four = sampler.generate([0, 1, 2, 3], **kwargs).astype(int)
    pairs = np.concatenate([sampler.generate([0, 1], **kwargs),
                            sampler.generate([2, 3], image_ids=[2, 3], **kwargs)]).astype(int)
    difference = np.abs(four - pairs)
    assert difference.max() <= BFLOAT16_BATCH_LEVELS, difference.max()


BFLOAT16_BATCH_LEVELS = 7  # the README's bound (Sampling, Resuming) on an image's change with its batch in bf16


@contextlib.contextmanager
def counting_lowerings():
    """Counts jit lowerings (one per new compilation, whatever the persistent cache holds). It first
    sees one of its own, so a test that expects none cannot pass because jax renamed the event."""
    events = []
    listener = lambda event, seconds, **kwargs: events.append(event) if event == LOWERING_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0))  # a new function: lowered, whatever was compiled before
        assert events == [LOWERING_EVENT], f"counting_lowerings saw {events} for one lowering"
        events.clear()
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def test_a_new_cfg_scale_reuses_the_compiled_stages(tiny):
    """The demo's CFG slider and a CFG sweep must not compile the model again per value."""
    model, config, sampler = tiny
    kwargs = dict(steps_per_stage=2, seed=7)  # a batch of 3: no other test compiled it
    with counting_lowerings() as first:
        at_2 = sampler.generate([3, 4, 5], cfg_scale=2.0, **kwargs)
    with counting_lowerings() as again:
        at_3 = sampler.generate([3, 4, 5], cfg_scale=3.0, **kwargs)
    assert len(first) >= 2 and again == [], (first, again)  # the test can see a compilation
    assert np.abs(at_3.astype(int) - at_2.astype(int)).mean() > 1  # the scale still takes effect
    # CFG 1 is unguided: programs of its own (half the batch).
    with counting_lowerings() as unguided_compiles:
        unguided = sampler.generate([3, 4, 5], cfg_scale=1.0, **kwargs)
    assert len(unguided_compiles) >= 1
    assert np.abs(unguided.astype(int) - at_2.astype(int)).mean() > 1


def test_a_stage_program_traced_outside_interpret_kernels_is_not_reused_inside_it(tiny):
    """The kernels' modes are read when a stage is traced: a program kept from outside
    interpret_kernels ran compiled kernels inside it (an interpreted one, slowly, after it), and one
    traced outside compiling_for ran this host's backends in a program meant for another platform."""
    from pixelflow_jax.kernels.attention import compiling_for, interpret_kernels

    sampler = tiny[2]
    kwargs = dict(steps_per_stage=1, cfg_scale=2.0, seed=4)
    outside = sampler.generate([6, 7], **kwargs)
    with interpret_kernels(), counting_lowerings() as inside:
        sampler.generate([6, 7], **kwargs)
    with counting_lowerings() as after:
        np.testing.assert_array_equal(sampler.generate([6, 7], **kwargs), outside)
    assert len(inside) >= sampler.scheduler.num_stages and after == [], (inside, after)
    first_stage = lambda: sampler.stage_call(0, *[None] * 5, SamplingOptions.create(4, 1))[0]
    with compiling_for("gpu"):
        for_a_gpu = first_stage()
    assert for_a_gpu is not first_stage() and first_stage() is first_stage()


def test_a_stage_program_for_a_gpu_compiles_its_matmuls_for_cublas(tiny, monkeypatch, tmp_path):
    """On a GPU the stages' programs carry xla_gpu_enable_triton_gemm=false to XLA (cuBLAS was 5.5%
    faster than XLA's Triton GEMMs on an H200). Compiled for this host (a CPU takes the option too): XLA's
    record of the options it compiled with shows it arrived. A program made for a CPU is another."""
    from pixelflow_jax.sampling import cascade

    model, config, sampler = tiny
    size = cascade.stage_resolutions(config.resolution, sampler.scheduler.num_stages)[0]
    cond, uncond = class_conditioning([1, 2], 1000)
    call = lambda: sampler.stage_call(0, np.zeros((2, size, size, 3), np.float32), None, cond, uncond, 1.0,
                                      SamplingOptions.create(4, 1))
    monkeypatch.setattr(cascade, "target_platform", lambda: "cpu")
    for_a_cpu = call()[0]
    monkeypatch.setattr(cascade, "target_platform", lambda: "gpu")
    program, args = call()
    assert program is not for_a_cpu
    program.lower(*args).compile(compiler_options={"xla_dump_to": str(tmp_path)})
    options = "".join(path.read_text() for path in tmp_path.glob("*.debug_options"))
    assert "xla_gpu_enable_triton_gemm: false" in options, options


@pytest.mark.parametrize("platform, xla_flags, expected", [
    ("gpu", "--xla_force_host_platform_device_count=8", {"xla_gpu_enable_triton_gemm": False}),
    ("gpu", "--xla_gpu_enable_triton_gemm_any=true", {"xla_gpu_enable_triton_gemm": False}),  # another flag
    ("gpu", "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=true", {}),  # the user's choice is kept
    ("gpu", "-xla_gpu_enable_triton_gemm", {}),
    ("tpu", "", {}),  # libtpu may refuse a GPU option
    ("cpu", "", {}),  # CPU programs stay as they were
])
def test_sampling_compiler_options_are_for_gpus_and_yield_to_the_users_xla_flags(monkeypatch, platform, xla_flags,
                                                                                 expected):
    """jit's compiler options override XLA_FLAGS, so the sampler leaves out an option the user set there."""
    from pixelflow_jax.kernels.attention import compiling_for
    from pixelflow_jax.sampling.cascade import sampling_compiler_options

    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    with compiling_for(platform):
        assert dict(sampling_compiler_options()) == expected


def test_a_model_loaded_again_samples_with_the_compiled_programs_of_the_first(converted):
    """A notebook's load_model and CascadeSampler again, with the same settings: the stages are cached
    on the model's graph, not on the model, and the noise and finishing programs are module-level jits."""
    def images():
        model, config = load_model(converted["c2i_tiny"])
        return CascadeSampler(model, config).generate([1, 2, 3, 4, 5], steps_per_stage=(1, 3, 1, 2), seed=3)

    first = images()
    with counting_lowerings() as compiled:
        again = images()
    assert compiled == []
    np.testing.assert_array_equal(again, first)


@pytest.mark.parametrize("dtype, highest", [("float32", True), ("bfloat16", False)])
def test_a_float32_model_samples_with_float32_matmuls(converted, monkeypatch, dtype, highest):
    """float32 sampling ran its matmuls at the platform's default precision: TF32 on GPUs, one
    bfloat16 pass on TPUs (the release's float32 is float32). bf16 models keep the default."""
    from pixelflow_jax.sampling import cascade

    compiled_dots, stage_program = [], cascade._stage_program  # (a dot's precision is in the lowered text)

    def recording(*key):
        program = stage_program(*key)

        def run(*args):  # lowered only: the programs are read, not compiled or run
            lowered = program.lower(*args)
            compiled_dots.extend("HIGHEST" in line for line in lowered.as_text().splitlines() if "dot_general" in line)
            return jax.numpy.zeros(lowered.out_info.shape, lowered.out_info.dtype)
        return run

    model, config = load_model(converted["c2i_tiny"], dtype=dtype)
    sampler = CascadeSampler(model, config)
    monkeypatch.setattr(cascade, "_stage_program", recording)
    sampler.generate([1, 2], steps_per_stage=1)
    assert compiled_dots and set(compiled_dots) == {highest}
    compiled_dots.clear()
    with jax.default_matmul_precision("highest"):  # a precision the user set is kept, whatever the model's dtype
        sampler.generate([1, 2], steps_per_stage=1)
    assert compiled_dots and set(compiled_dots) == {True}


@pytest.mark.slow  # two dopri5 compilations
def test_a_notebook_with_jax_enable_x64_samples_the_same_images(tiny):
    """With jax_enable_x64 on (a notebook's float64 work beside the model), dopri5 failed inside
    lax.cond: diffrax solved in float64 from the Python-float times, and the NaN branch stayed float32."""
    kwargs = dict(cfg_scale=2.0, solver="dopri5", seed=3)
    with jax.enable_x64(True):
        wide = tiny[2].generate([1], **kwargs)
    np.testing.assert_array_equal(wide, tiny[2].generate([1], **kwargs))


def test_class_conditioning_stays_on_the_host():
    """Device labels (eager jnp ops) queued behind the batch being sampled, and the sampling job read
    them back at once: each batch waited for the one before it before it could be dispatched."""
    cond, uncond = class_conditioning([3, 4], 10)
    assert all(type(c["class_labels"]) is np.ndarray for c in (cond, uncond))
    assert cond["class_labels"].tolist() == [3, 4] and uncond["class_labels"].tolist() == [10, 10]
    assert cond["class_labels"].dtype == np.int32


def test_on_8_devices_a_guided_stage_keeps_every_image_on_its_device(tiny):
    """With the guided batch built as [uncond half; cond half], the mesh's split of it put other
    images' rows on each device, and every solver step moved latents between devices (all-to-all
    and permutes). Each image's pair side by side keeps a stage free of collectives."""
    from pixelflow_jax.sampling import cascade
    from pixelflow_jax.sharding import batch_sharding, global_array, make_mesh, replicated

    model, config, sampler = tiny
    mesh = make_mesh()
    assert mesh.size == 8
    rows, everywhere = batch_sharding(mesh), replicated(mesh)
    state = jax.tree.map(lambda a: global_array(np.asarray(a), everywhere), sampler.state)
    x, noise = (global_array(np.zeros((8, size, size, 3), np.float32), rows) for size in (32, 64))  # stage 3 of 64 px
    cond, uncond = (jax.tree.map(lambda a: global_array(a, rows), c) for c in class_conditioning(np.arange(8), 1000))
    timesteps, t = sampler.scheduler.set_timesteps(2, 3)
    schedule = (timesteps.astype(np.float32), np.diff(t.astype(np.float32)))
    alpha, beta = cascade.renoise_coefficients(sampler.scheduler.original_start_t[3], sampler.scheduler.gamma)
    program = cascade._stage_program(sampler.graphdef, True, alpha, beta, "euler")
    with jax.set_mesh(mesh):
        hlo = program.lower(state, x, noise, cond, uncond, schedule, np.float32(2.4)).compile().as_text()
    moves = [line.strip()[:120] for line in hlo.splitlines()
             if any(f" {op}(" in line or f" {op}-start(" in line
                    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))]
    assert "while" in hlo and not moves, moves


def test_bad_options_are_rejected(tiny):
    sampler = tiny[2]
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 999\], got \[1000\]"):
        sampler.generate([1000])
    with pytest.raises(ValueError, match="one value per stage"):
        sampler.generate([1], steps_per_stage=[3, 3])
    with pytest.raises(ValueError, match="solver"):
        sampler.generate([1], solver="heun")


@pytest.mark.parametrize("options, message", [
    ({"steps_per_stage": (1, 0, 1, 1)}, r"steps_per_stage must be positive, got \(1, 0, 1, 1\)"),
    ({"cfg_scale": 0.5}, r"cfg_scale must be a finite number in \[1, 1000\] \(1 = no guidance\), got 0.5"),
    ({"cfg_scale": 1000.5}, r"cfg_scale must be a finite number in \[1, 1000\]"),
    ({"shift": 0.0}, "shift must be a finite positive number, got 0.0"),
    ({"shift": float("inf")}, "shift must be a finite positive number, got inf"),
    ({"rtol": 0.0}, "rtol must be a finite positive number, got 0.0"),
    ({"atol": 0.0}, "atol must be a finite positive number, got 0.0"),
    ({"atol": float("nan")}, "atol must be a finite positive number, got nan"),
])
def test_sampling_options_refuse_each_bound_they_name(options, message):
    """SamplingOptions made in Python skip the config's checks: a CFG below 1 steers away from the
    class, a shift of 0 puts every Euler step at one time, and a dopri5 tolerance of 0 never meets."""
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**{"steps_per_stage": (1, 1, 1, 1), **options})
    for cfg_scale in (1.0, 1000.0):  # the bounds themselves, and small positive shifts and tolerances
        SamplingOptions(steps_per_stage=(1, 1, 1, 1), cfg_scale=cfg_scale, shift=1e-3, rtol=1e-9, atol=1e-9)


def test_a_non_finite_sample_names_its_first_ten_image_ids_and_says_when_there_are_more():
    from pixelflow_jax.sampling.cascade import check_finite

    ids = np.arange(100, 112)
    with pytest.raises(ValueError, match=re.escape(f"image ids {list(range(100, 110))}: the model's")):
        check_finite(np.zeros(10, bool), ids[:10])
    with pytest.raises(ValueError, match=re.escape(f"image ids {list(range(100, 110))} ...: the model's")):
        check_finite(np.zeros(11, bool), ids[:11])
    with pytest.raises(ValueError, match=re.escape("image ids [101, 111]: ")):
        check_finite(np.arange(12) % 10 != 1, ids)
    check_finite(np.ones(12, bool), ids)


def test_an_image_with_an_infinite_value_is_not_finite():
    """An inf latent is clipped to a white pixel, silently, as a NaN became a black one: each image
    with a NaN, an inf or a -inf anywhere is flagged; finite ones far outside [-1, 1] are not."""
    from pixelflow_jax.sampling.cascade import finite_images

    latents = np.zeros((5, 4, 4, 3), np.float32)
    latents[1, 3, 2, 1], latents[2, 0, 0, 0], latents[3, 1, 1, 2], latents[4] = np.nan, np.inf, -np.inf, 3e38
    np.testing.assert_array_equal(np.asarray(finite_images(latents)), [True, False, False, False, True])


def test_a_non_finite_sample_is_an_error_not_a_black_image(tiny, tmp_path):
    """NaN latents became black PNGs that joined samples.npz and the FID; dopri5 ended in diffrax's
    'increase max_steps' from inside a callback after 4,096 rejected steps."""
    import jax.numpy as jnp
    from flax import nnx

    from pixelflow_jax.sampling.sample_run import write_local_images

    model, config, _ = tiny
    broken = nnx.clone(model)
    state = nnx.state(broken, nnx.Param)
    nnx.update(broken, jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state))
    sampler = CascadeSampler(broken, config)
    for solver in ("euler", "dopri5"):
        with pytest.raises(ValueError, match=r"sampling gave NaN or inf for image ids \[0, 1\]"):
            sampler.generate([3, 4], steps_per_stage=1, cfg_scale=2.0, solver=solver)
    with pytest.raises(ValueError, match=r"sampling gave NaN or inf for image ids \[7, 9\]"):  # the ids asked for
        sampler.generate([3, 4], steps_per_stage=1, cfg_scale=2.0, image_ids=[7, 9])

    images = jnp.zeros((3, 8, 8, 3), jnp.uint8)
    for finite, bad in (([True, False, False], 11), ([False, True, True], 10)):  # the batch's first image too
        with pytest.raises(ValueError, match=rf"NaN or inf for image ids \[{bad}\]"):
            write_local_images(str(tmp_path), images, jnp.array(finite), np.array([10, 11, 11]), 2)
        assert not list(tmp_path.iterdir())  # not even the finite image of that batch
    write_local_images(str(tmp_path), images, jnp.array([True, True, False]), np.array([10, 11, 11]), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000010.png", "000011.png"]  # the padding row is no image


def test_each_valid_row_is_written_once_under_its_id_and_a_padding_row_never(tmp_path, monkeypatch):
    """A batch is padded with copies of its last id: a padding row written too would replace that
    image with itself computed in another row (on another host, a second writer of one file). Of
    rows held by several devices (a replicated batch), one copy is written, not one per device; a
    padding row's finite flag is no image's."""
    from pixelflow_jax.sampling import sample_run
    from pixelflow_jax.sharding import batch_sharding, global_array, make_mesh, replicated

    mesh = make_mesh()
    rows = np.broadcast_to(np.arange(8, dtype=np.uint8)[:, None, None, None] * 10, (8, 2, 2, 3))  # row r: level 10r
    ids = np.array([40, 41, 42, 43, 44, 45, 45, 45])  # 6 images and 2 padding rows
    written, save = [], sample_run.save_png_atomically
    monkeypatch.setattr(sample_run, "save_png_atomically", lambda path, png: written.append(path) or save(path, png))
    for sharding in (batch_sharding(mesh), replicated(mesh)):
        written.clear()
        sample_run.write_local_images(str(tmp_path), global_array(np.ascontiguousarray(rows), sharding),
                                      global_array(np.arange(8) < 6, replicated(mesh)), ids, 6)
        assert sorted(written) == [sample_run.image_path(str(tmp_path), i) for i in range(40, 46)], sharding
        for row, i in enumerate(range(40, 46)):
            assert np.asarray(Image.open(sample_run.image_path(str(tmp_path), i)))[0, 0, 0] == 10 * row


def test_the_demo_check_reads_what_each_image_asks_for_and_counts_what_it_shows(tmp_path):
    """--mode=sample on a demo run prints how many images show the asked hue and outline: a class
    asks for hue c and outline c mod 5, a prompt for the colour and shape it names."""
    from types import SimpleNamespace

    from pixelflow_jax.data.demo_data import captioned_demo_image, demo_image
    from pixelflow_jax.sampling import demo_check

    assert demo_check.asked_by_prompt("a red disk", 10) == (0, 0)
    assert demo_check.asked_by_prompt("A ring in Blue", 10) == (7, 4)
    assert demo_check.asked_by_prompt("an orange square on a grey background", 10) == (1, 1)
    for unchecked in ("a cat", "a red and blue disk", "a red disk and a ring", "a reddish disk"):
        assert demo_check.asked_by_prompt(unchecked, 10) is None, unchecked
    assert demo_check.asked_by_prompt("a hue 60 triangle", 6) == (1, 2)  # other counts name hues by degree

    # The demo's own training images show what they ask for; shifted by one class they do not.
    images = np.stack([demo_image(i, num_classes=10, resolution=32)[0] for i in range(10)])
    labels = SimpleNamespace(labels=np.arange(10))
    line = demo_check.report(images, demo_check.asked_of(labels, 10), 10)
    assert line.startswith("demo check (10 images, read by demo_data.classify): hue 10/10 (100%), outline 10/10 "
                           "(100%): disk 2/2, square 2/2, triangle 2/2, diamond 2/2, ring 2/2"), line
    shifted = demo_check.report(np.roll(images, 1, axis=0), demo_check.asked_of(labels, 10), 10)
    assert "hue 0/10 (0%), outline 0/10 (0%)" in shifted, shifted

    drawn = [captioned_demo_image(i, num_colours=10, resolution=32) for i in range(3)]
    prompts = SimpleNamespace(prompts=[d.caption for d in drawn] + ["a cat"], images_per_prompt=2, num_images=8)
    pictures = np.stack([d.image for d in drawn for _ in range(2)] + [drawn[0].image] * 2)
    asked = demo_check.asked_of(prompts, 10)
    assert asked.ids.tolist() == [0, 1, 2, 3, 4, 5]
    line = demo_check.report(pictures, asked, 10)
    assert "(6 images, read by demo_data.classify): hue 6/6" in line and line.endswith(
        "; 2 images from prompts naming no demo colour and shape not checked"), line


def test_the_demo_checks_line_to_a_stdout_that_cannot_be_written_is_lost_as_others(tmp_path, monkeypatch, caplog):
    """Its line goes the way of the job's others (one warning, stdout to /dev/null), not into the
    'check was not made' warning with the line still held back for a failed flush at exit."""
    from types import SimpleNamespace

    from pixelflow_jax.data.demo_data import demo_image
    from pixelflow_jax.sampling import demo_check

    images = np.stack([demo_image(i, num_classes=10, resolution=32)[0] for i in range(2)])
    np.savez(tmp_path / "samples.npz", images)
    monkeypatch.setattr(demo_check, "demo_colours_of", lambda run: 10)
    monkeypatch.setattr("sys.stdout", open("/dev/full", "w", buffering=1))
    demo_check.print_for("run", SimpleNamespace(labels=np.arange(2)), str(tmp_path / "samples.npz"))
    warnings = [r.getMessage() for r in caplog.records]
    assert any("stdout cannot be written" in w for w in warnings) and not any("not made" in w for w in warnings)


def test_a_job_pads_its_batches_as_little_as_one_static_shape_allows():
    from pixelflow_jax.sharding import batch_for

    assert batch_for(50, 16, 1) == 13  # 4 batches either way: 52 rows, not 64
    assert batch_for(17, 16, 1) == 9
    assert batch_for(50, 16, 8) == 16  # a multiple of the devices
    assert batch_for(4, 10**6, 8) == 8  # few images: no batch of 10**6 (it ran out of memory)
    assert batch_for(64, 16, 8) == 16
    assert batch_for(10, 4, 8) == 8  # a batch below the device count: one image per device


def recorded_stages(sampler, monkeypatch, options, cond, uncond, batch=2):
    """Runs sampler.sample with every stage program replaced by a recorder (no model runs, nothing
    compiles): [(renoise, alpha, beta, solver, schedule, guidance)] per stage, in stage order."""
    from pixelflow_jax.sampling import cascade
    from pixelflow_jax.scheduler import stage_resolutions

    calls = []

    def recording(graphdef, renoise, alpha, beta, solver):
        def run(state, x, noise, cond, uncond, schedule, guidance):
            calls.append((renoise, alpha, beta, solver, schedule, guidance))
            return np.zeros(np.shape(noise) if renoise else np.shape(x), np.float32)
        return run

    monkeypatch.setattr(cascade, "_stage_program", recording)
    sizes = stage_resolutions(sampler.resolution, sampler.scheduler.num_stages)
    noise = [np.zeros((batch, r, r, 3), np.float32) for r in sizes]
    sampler.sample(noise[0], noise[1:], cond, uncond, options)
    return calls


def test_each_euler_stage_gets_the_release_grid_renoise_and_guidance(tiny, golden, monkeypatch):
    """Pins what each stage program is handed, against the release's recorded scheduler grids and
    the release's formulas in float64: the Euler timesteps (descending noise, stage-wise, with the
    shift) and float32 step sizes; renoising only from stage 1, with alpha = 1 / (sqrt(1 - 1/gamma)
    (1 - t0) + t0), beta = alpha (1 - t0) / sqrt(-gamma); guidance 1 + (cfg - 1) w_s, none at g = 1."""
    g, gamma, cfg = golden["c2i_tiny"], -1.0 / 3.0, 3.0
    cond, uncond = class_conditioning([1, 2], 1000)
    calls = recorded_stages(tiny[2], monkeypatch, SamplingOptions.create(4, 7, cfg_scale=cfg, shift=3.0), cond, uncond)
    assert len(calls) == 4
    for stage, (renoise, alpha, beta, solver, (timesteps, dts), guidance) in enumerate(calls):
        assert solver == "euler" and renoise == (stage > 0)
        t0 = float(g[f"sched_original_start_t_{stage}"])
        expected_alpha = 1.0 / (np.sqrt(1.0 - 1.0 / gamma) * (1.0 - t0) + t0)
        if stage > 0:
            assert alpha == pytest.approx(expected_alpha, rel=1e-12)
            assert beta == pytest.approx(expected_alpha * (1.0 - t0) / np.sqrt(-gamma), rel=1e-12)
        np.testing.assert_allclose(timesteps, g[f"sched_set_7_3.0_{stage}_Timesteps"].astype(np.float32), rtol=1e-6)
        np.testing.assert_array_equal(dts, np.diff(g[f"sched_set_7_3.0_{stage}_t"].astype(np.float32)))
        weight = [0.0, 1.0 / 6.0, 2.0 / 3.0, 1.0][stage]
        if weight == 0:
            assert guidance is None  # g = 1: the unguided half-batch program
        else:
            assert guidance == pytest.approx(1.0 + (cfg - 1.0) * weight, rel=1e-6)


def test_each_dopri5_stage_gets_its_timestep_range_and_the_asked_tolerances(tiny, golden, monkeypatch):
    """dopri5 maps t in [0, 1] onto the stage's first..last Timesteps_per_stage entry with the
    rtol / atol the caller asked for (not the defaults, not swapped)."""
    g = golden["c2i_tiny"]
    cond, uncond = class_conditioning([1, 2], 1000)
    options = SamplingOptions.create(4, 1, cfg_scale=2.0, solver="dopri5", rtol=2e-4, atol=3e-7)
    calls = recorded_stages(tiny[2], monkeypatch, options, cond, uncond)
    for stage, (_, _, _, solver, schedule, _) in enumerate(calls):
        table = g[f"sched_Timesteps_per_stage_{stage}"]
        assert solver == "dopri5"
        np.testing.assert_allclose(schedule, np.float32([table[0], table[-1], 2e-4, 3e-7]), rtol=1e-6)

def test_a_dopri5_solve_cut_short_by_its_step_limit_comes_out_nan_not_where_it_stopped(monkeypatch):
    """diffrax (throw=False) returns a solve that ran out of steps as the finite state where it stopped,
    short of the stage's end: an image unfinished, written as if whole. It comes out NaN, which the job's
    check names. The same solve with the step limit in place reaches the end."""
    import jax.numpy as jnp

    from pixelflow_jax.sampling import cascade

    def velocity(x, timestep):  # x(t) = exp(-sin(50 t)) over the stage, t in [0, 1]
        return -50.0 * x * jnp.cos(timestep / 20.0)

    x = jnp.ones((1, 2, 2, 3), jnp.float32)
    whole = cascade._dopri5(velocity, x, np.float32(0.0), np.float32(1000.0), 1e-6, 1e-6)
    np.testing.assert_allclose(np.asarray(whole), np.exp(-np.sin(50.0)), rtol=1e-3)
    monkeypatch.setattr(cascade, "DOPRI5_MAX_STEPS", 2)
    assert np.isnan(np.asarray(cascade._dopri5(velocity, x, np.float32(0.0), np.float32(1000.0), 1e-6, 1e-6))).all()


def test_a_text_conditional_model_is_guided_by_cfg_at_every_stage(converted, monkeypatch):
    """Text-conditional: g_s = cfg at every stage (the class schedule, g_0 = 1, is class models' only)."""
    model, config = load_model(converted["t2i_tiny"])
    sampler = CascadeSampler(model, config)
    states = {"encoder_hidden_states": np.zeros((2, 4, 20), np.float32),
              "encoder_attention_mask": np.ones((2, 4), np.int32)}
    calls = recorded_stages(sampler, monkeypatch, SamplingOptions.create(4, 2, cfg_scale=4.0), states, states)
    assert [guidance for *_, guidance in calls] == [4.0] * 4


class VelocityOfLabels:
    """A stand-in model: v = x * (1 + label) + timestep / 1000, so each row shows which label and
    timestep it got."""

    def __call__(self, x, timesteps, class_labels):
        scale = (1.0 + class_labels.astype(np.float32))[:, None, None, None]
        return x * scale + timesteps[:, None, None, None] / 1000.0


def test_guided_velocity_is_uncond_plus_scale_times_cond_minus_uncond():
    """v = v_u + g (v_c - v_u) per image, v_u from the null class and v_c from the image's own,
    both at the same timestep; no guidance (None) is v_c alone."""
    from pixelflow_jax.sampling.cascade import guided_velocity

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 2, 3)).astype(np.float32)
    cond, uncond = class_conditioning([2, 5, 7], 10)
    model = VelocityOfLabels()
    v = lambda labels: x.astype(np.float64) * (1.0 + labels)[:, None, None, None] + 0.4
    v_c, v_u = v(np.array([2, 5, 7])), v(np.array([10, 10, 10]))
    got = guided_velocity(model, jax.numpy.asarray(x), np.float32(400.0), cond, uncond, np.float32(2.5))
    np.testing.assert_allclose(np.asarray(got), v_u + 2.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    unguided = guided_velocity(model, jax.numpy.asarray(x), np.float32(400.0), cond, uncond, None)
    np.testing.assert_allclose(np.asarray(unguided), v_c, rtol=1e-5, atol=1e-5)


def test_dopri5_integrates_over_the_stage_timesteps_with_the_tolerances_it_is_given():
    """dx/dt = v(x, T(t)) for t in [0, 1], T(t) = T_first + t (T_last - T_first), here with
    v = 4 x + (T - 800) / 100: from 900 down to 700 the result is x0 e^4 + int_0^1 e^(4 (1 - s))
    (1 - 2 s) ds (scipy quad, float64), which the reverse direction does not give. At T = 800
    throughout (x0 e^4) the error follows rtol where |x| is large and atol where it is small, each
    reaching the step control as given."""
    import functools

    from scipy import integrate

    from pixelflow_jax.sampling.cascade import _dopri5

    solve = jax.jit(functools.partial(_dopri5, lambda x, T: 4.0 * x + (T - 800.0) / 100.0))
    f32 = np.float32
    got = solve(np.full((1, 1), 0.5, f32), f32(900.0), f32(700.0), f32(1e-6), f32(1e-9))
    forcing = integrate.quad(lambda s: np.exp(4.0 * (1 - s)) * (1 - 2 * s), 0, 1, epsabs=1e-13)[0]
    np.testing.assert_allclose(np.asarray(got), 0.5 * np.exp(4.0) + forcing, rtol=1e-4)

    def error(x0, rtol, atol):
        x = solve(np.full((1, 1), x0, f32), f32(800.0), f32(800.0), f32(rtol), f32(atol))
        return float(np.abs(np.asarray(x, np.float64) / (x0 * np.exp(4.0)) - 1).max())

    assert error(1.0, 1e-1, 1e-12) > 10 * error(1.0, 1e-6, 1e-12)  # rtol reaches the solver
    assert error(1e-4, 1e-12, 1e-5) > 10 * error(1e-4, 1e-12, 1e-8)  # atol too
    assert error(100.0, 1e-1, 1e-6) > 10 * error(100.0, 1e-6, 1e-1)  # each as itself (|x| >= 100: rtol governs)
