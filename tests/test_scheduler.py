"""The scheduler port against the release's tables (float64, <= 1e-12 relative)."""

import re

import numpy as np
import pytest

from pixelflow_jax.scheduler import PixelFlowScheduler, renoise_coefficients


def assert_close(actual, expected, rtol=1e-12):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("stage", range(4))
def test_tables_match_release(golden, stage):
    g = golden["c2i_tiny"]
    scheduler = PixelFlowScheduler(1000, num_stages=4)
    assert_close(scheduler.timesteps_per_stage[stage], g[f"sched_Timesteps_per_stage_{stage}"])
    assert_close(scheduler.t_window_per_stage[stage], g[f"sched_t_window_{stage}"])
    assert_close(scheduler.start_t[stage], g[f"sched_start_t_{stage}"])
    assert_close(scheduler.end_t[stage], g[f"sched_end_t_{stage}"])
    assert_close(scheduler.original_start_t[stage], g[f"sched_original_start_t_{stage}"])


@pytest.mark.parametrize("stage", range(4))
@pytest.mark.parametrize("steps,shift", [(3, 1.0), (7, 3.0)])
def test_set_timesteps_matches_release(golden, stage, steps, shift):
    for name in ("c2i_tiny", "t2i_tiny"):
        g = golden[name]
        timesteps, t = PixelFlowScheduler(1000, 4).set_timesteps(steps, stage, shift=shift)
        assert_close(timesteps, g[f"sched_set_{steps}_{shift}_{stage}_Timesteps"])
        assert_close(t, g[f"sched_set_{steps}_{shift}_{stage}_t"])


def test_rectified_start_matches_renoise_alpha():
    # start_t of a stage is its original start time scaled by the renoise alpha (gamma = -1/3).
    scheduler = PixelFlowScheduler()
    for stage in range(1, 4):
        alpha, beta = renoise_coefficients(scheduler.original_start_t[stage])
        assert scheduler.start_t[stage] == pytest.approx(scheduler.original_start_t[stage] * alpha, rel=1e-15)
        assert beta == pytest.approx(alpha * (1 - scheduler.original_start_t[stage]) * 3 ** 0.5, rel=1e-15)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_stages"):
        PixelFlowScheduler(1000, 0)
    # fewer timesteps than stages gave stages whose timesteps were all 0
    with pytest.raises(ValueError, match="num_train_timesteps 3 must be at least num_stages 4"):
        PixelFlowScheduler(3, num_stages=4)
    # The release's arithmetic feeds stage 0 of 4 the timestep 0 alone with 4 to 7 training timesteps,
    # and stage 0 of 9 with 21 (so not only below 2 x num_stages); training refuses them (test_config_checks),
    # while such a model still samples, with the schedule the release would give it.
    for n, stages, alike in ((4, 4, [0]), (7, 4, [0]), (8, 4, []), (21, 9, [0]), (22, 9, []), (1000, 4, [])):
        assert PixelFlowScheduler(n, num_stages=stages).stages_with_one_timestep() == alike
    # the count a refusal suggests: the next that trains, past the gap of 9 stages (22 trains, 23 and 24 do not)
    for n, stages, works in ((4, 4, 8), (7, 4, 8), (21, 9, 22), (23, 9, 25), (2, 1, 3)):
        assert PixelFlowScheduler(n, num_stages=stages).smallest_count_above_that_trains() == works
    # the stages' shares follow gamma's rectification: a scheduler of another gamma is asked with its own
    assert PixelFlowScheduler(9, num_stages=9, gamma=-0.9).smallest_count_above_that_trains() == 18
    assert PixelFlowScheduler(4, num_stages=4).set_timesteps(3, 3)[0].tolist() == [2.0, 2.5, 3.0]
    with pytest.raises(ValueError, match="stage must be in"):
        PixelFlowScheduler(1000, 4).set_timesteps(3, 4)
    for shift in (0.0, -1.0, float("nan"), float("inf")):  # were NaN timesteps, or ones far outside [0, 1000)
        with pytest.raises(ValueError, match=f"shift must be a finite positive number, got {shift}"):
            PixelFlowScheduler(1000, 4).set_timesteps(3, 0, shift)
    with pytest.raises(ValueError, match="shift must be a finite positive number, got '2'"):  # was math's TypeError
        PixelFlowScheduler(1000, 4).set_timesteps(3, 0, "2")
    assert PixelFlowScheduler(1000, 4).set_timesteps(3, 0, np.float32(2.0))[0].tolist() == \
        PixelFlowScheduler(1000, 4).set_timesteps(3, 0, 2.0)[0].tolist()
    # A float count failed inside numpy, a str on a comparison, gamma 0 on a division by zero; whole
    # numbers of any type are counts.
    for arguments, message in ((("1000", 4), "num_train_timesteps must be a whole number, got '1000'"),
                               ((1000, 2.5), "num_stages must be a whole number, got 2.5"),
                               ((1000, 4, 0.0), "gamma must be a finite negative number"),
                               ((1000, 4, 0.5), "gamma must be a finite negative number"),
                               ((1000, 4, float("-inf")), "the release's: -1/3), got -inf"),
                               ((1000, 4, "-1/3"), "the release's: -1/3), got '-1/3'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            PixelFlowScheduler(*arguments)
    assert PixelFlowScheduler(1000, 4, np.float32(-1 / 3)).gamma == pytest.approx(-1 / 3)  # a numpy number is one
    scheduler = PixelFlowScheduler(1000.0, np.int64(4))
    for arguments, message in (((2.5, 0), "num_inference_steps must be a whole number, got 2.5"),
                               ((3, "1"), "stage must be a whole number, got '1'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            scheduler.set_timesteps(*arguments)
    np.testing.assert_array_equal(scheduler.set_timesteps(np.int64(3), 1.0)[0], scheduler.set_timesteps(3, 1)[0])


def test_stage_boundaries_are_the_releases_float32_times():
    """The release keeps its grid of training times and their normalised copy in float32: stage 1
    of 3 starts at float32(333) / float32(1000), not at 0.333 (4 stages of 1000 start on times that
    float32 holds exactly, so the golden tables cannot tell)."""
    scheduler = PixelFlowScheduler(1000, num_stages=3)
    in_float32 = float(np.float32(333) / np.float32(1000))
    assert in_float32 != 0.333
    assert scheduler.original_start_t[1] == scheduler.end_t[0] == in_float32


def test_two_training_timesteps_in_one_stage_are_two_times():
    scheduler = PixelFlowScheduler(2, num_stages=1)
    assert scheduler.timesteps_per_stage[0].tolist() == [0.0, 1.0]
    assert scheduler.stages_with_one_timestep() == []


def test_one_training_timestep_is_refused():
    """One timestep gives a stage window of one time, t_end == t_start: set_timesteps' slope 0 / 0."""
    with pytest.raises(ValueError, match="num_train_timesteps must be at least 2, got 1"):
        PixelFlowScheduler(1, num_stages=1)


def test_a_gamma_of_the_callers_own_rectifies_and_renoises_with_it():
    """Every table and coefficient follows the gamma given, not the release's -1/3 (the only one the
    golden tables hold): alpha = 1 / (sqrt(1 - 1/gamma) (1 - t0) + t0), beta = alpha (1 - t0) / sqrt(-gamma)."""
    gamma = -1.0
    scheduler = PixelFlowScheduler(1000, 4, gamma=gamma)
    for stage in range(1, 4):
        t0 = scheduler.original_start_t[stage]
        alpha = 1.0 / (2 ** 0.5 * (1.0 - t0) + t0)
        assert renoise_coefficients(t0, gamma) == pytest.approx((alpha, alpha * (1.0 - t0)), rel=1e-15)
        assert scheduler.start_t[stage] == pytest.approx(t0 * alpha, rel=1e-15)


def test_set_timesteps_refuses_no_steps_and_reads_any_scalar_shift():
    """0 steps gave an empty grid (a stage sampled by no step at all); a shift held in a 0-d numpy or
    jax array is the number it holds."""
    import jax.numpy as jnp

    scheduler = PixelFlowScheduler(1000, 4)
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1, got 0"):
        scheduler.set_timesteps(0, 0)
    expected = scheduler.set_timesteps(3, 1, 2.0)
    for shift in (np.array(2.0), jnp.float32(2.0)):
        for actual, wanted in zip(scheduler.set_timesteps(3, 1, shift), expected):
            np.testing.assert_array_equal(actual, wanted)
