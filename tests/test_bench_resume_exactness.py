"""bench/resume_exactness.py's comparison, checked without running a training step (the GPU session's
dry run, tests/test_bench.py, runs the script end to end at tiny sizes)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import resume_exactness  # noqa: E402


def parts(whole, first, second, whole_state="a", second_state="a"):
    hexed = lambda losses: [float(x).hex() for x in losses]
    where = dict(device="cpu", jax="0")
    return (dict(where, whole_losses=hexed(whole), whole_digest=whole_state, first_losses=hexed(first)),
            dict(where, second_losses=hexed(second), second_digest=second_state))


def test_a_resume_is_exact_only_when_every_loss_and_the_whole_state_are_the_same_bits():
    args = resume_exactness.parse_args(["--steps=4"])
    same = resume_exactness.compared(args, *parts([1.0, 2.0, 3.0, 4.0], [1.0, 2.0], [3.0, 4.0]))
    assert (same["step_repeats_in_one_process"], same["resumed_losses_equal"], same["resumed_state_equal"],
            same["first_differing_step"]) == (True, True, True, None)
    # One ulp off at step 3, the last: a float32 loss printed to 7 digits would hide it.
    off = resume_exactness.compared(args, *parts([1.0, 2.0, 3.0, 4.0], [1.0, 2.0], [3.0, 4.000000000000001]))
    assert (off["resumed_losses_equal"], off["first_differing_step"]) == (False, 3)
    assert not resume_exactness.compared(args, *parts([1.0] * 4, [1.0] * 2, [1.0] * 2, second_state="b"))[
        "resumed_state_equal"]
    assert not resume_exactness.compared(args, *parts([1.0] * 4, [1.0, 1.5], [1.0] * 2))["step_repeats_in_one_process"]


def test_an_odd_step_count_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        resume_exactness.parse_args(["--steps=5"])
    assert "--steps must be even" in capsys.readouterr().err
