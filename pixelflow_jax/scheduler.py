"""PixelFlow's stage and time tables, ported from the release's PixelFlowScheduler (float64 numpy).

Stage 0 is the smallest resolution and the noisiest, stage S-1 is full resolution. For every stage
the tables give, per training index k in [0, num_train_timesteps):
  - `timesteps_per_stage[s][k]`: the timestep value fed to the model (in [0, num_train_timesteps)),
  - `t_window_per_stage[s][k]`:  the interpolation time within the stage (in [0, 1)),
and per stage the noise levels `start_t`, `end_t` and `original_start_t` (before rectification).

The arithmetic follows the release step by step, including where it runs in float32 (the
`Timesteps` grid and its normalised copy, whose values pick the stage boundaries). numpy's
linspace rounds the last bit differently from torch's, so the tables agree to ~1e-16 relative.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from pixelflow_jax.validation import integer

DEFAULT_GAMMA = -1.0 / 3.0


def rectify_ratio(start_t: float, gamma: float = DEFAULT_GAMMA) -> float:
    """alpha of the stage transition: 1 / (sqrt(1 - 1/gamma) (1 - t0) + t0)."""
    return 1.0 / (math.sqrt(1.0 - 1.0 / gamma) * (1.0 - start_t) + start_t)


def renoise_coefficients(original_start_t: float, gamma: float = DEFAULT_GAMMA) -> tuple[float, float]:
    """(alpha, beta) for x <- alpha * upsample(x) + beta * block_noise when a stage starts."""
    alpha = rectify_ratio(original_start_t, gamma)
    beta = alpha * (1.0 - original_start_t) / math.sqrt(-gamma)
    return alpha, beta


def stage_resolutions(resolution: int, num_stages: int) -> list[int]:
    """Image side of each stage, smallest first: R / 2^(S-1-s)."""
    return [resolution // 2 ** (num_stages - 1 - s) for s in range(num_stages)]


class PixelFlowScheduler:
    """Tables of the release's scheduler; `set_timesteps` returns the grids instead of storing them.

    num_train_timesteps: the model's time units (the release's 1000); num_stages: the cascade's
    stages (the release's 4); gamma: the correlation of the block noise that renoises each stage
    (negative; the release's -1/3).
    """

    def __init__(self, num_train_timesteps: int = 1000, num_stages: int = 4, gamma: float = DEFAULT_GAMMA):
        # (A float count failed inside numpy, a str on a comparison, gamma 0 on a division by zero.)
        num_train_timesteps = integer("num_train_timesteps", num_train_timesteps, where="")
        num_stages = integer("num_stages", num_stages, where="")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating, np.integer)) or not (
                math.isfinite(gamma) and gamma < 0):
            raise ValueError(f"gamma must be a finite negative number (the block noise's correlation; the "
                             f"release's: -1/3), got {gamma!r}")
        if num_stages < 1:
            raise ValueError(f"num_stages must be positive, got {num_stages}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        if num_train_timesteps < num_stages:  # stages without a timestep of their own: all 0, silently
            raise ValueError(f"num_train_timesteps {num_train_timesteps} must be at least num_stages {num_stages} "
                             "(each stage needs timesteps of its own; the release's: 1000)")
        self.num_train_timesteps = n = num_train_timesteps
        self.num_stages = num_stages
        self.gamma = gamma

        # The release keeps this grid and its normalised copy in float32.
        train_timesteps = np.linspace(0, n - 1, n, dtype=np.float32)
        train_t = train_timesteps / np.float32(n)
        stage_range = [x / num_stages for x in range(num_stages + 1)]

        self.start_t: list[float] = []
        self.end_t: list[float] = []
        self.original_start_t: list[float] = []
        stage_distance = []
        for s in range(num_stages):
            start_idx = max(int(n * stage_range[s]), 0)
            end_idx = min(int(n * stage_range[s + 1]), n)
            start_t = float(train_t[start_idx])
            end_t = float(train_t[end_idx]) if end_idx < n else 1.0
            self.original_start_t.append(start_t)
            if s > 0:
                start_t *= rectify_ratio(start_t, gamma)
            self.start_t.append(start_t)
            self.end_t.append(end_t)
            stage_distance.append(end_t - start_t)

        total_distance = sum(stage_distance)
        t_within_stage = np.linspace(0.0, 1.0, n + 1)[:-1]
        self.t_window_per_stage: list[np.ndarray] = []
        self.timesteps_per_stage: list[np.ndarray] = []
        for s in range(num_stages):
            start_ratio = 0.0 if s == 0 else sum(stage_distance[:s]) / total_distance
            end_ratio = 1.0 if s == num_stages - 1 else sum(stage_distance[: s + 1]) / total_distance
            first = float(train_timesteps[int(n * start_ratio)])
            last = float(train_timesteps[min(int(n * end_ratio), n - 1)])
            self.t_window_per_stage.append(t_within_stage)
            if s == num_stages - 1:
                self.timesteps_per_stage.append(np.linspace(first, last, n))
            else:
                self.timesteps_per_stage.append(np.linspace(first, last, n + 1)[:-1])

    def stages_with_one_timestep(self) -> list[int]:
        """The stages whose training timesteps are all one value, as the release's arithmetic gives
        with few training timesteps (stage 0 of 4 with 4 to 7; of 9 with 9 to 21, and 23, 24). A
        model trained so could not tell that stage's times apart (training refuses such a count)."""
        return [s for s, timesteps in enumerate(self.timesteps_per_stage) if timesteps.min() == timesteps.max()]

    def smallest_count_above_that_trains(self) -> int:
        """The smallest num_train_timesteps above this one that gives each of these stages timesteps of
        its own (at the release's gamma: 2 x num_stages up to 8 stages; irregular beyond: 22 serves 9 stages, 23
        and 24 do not)."""
        count = self.num_train_timesteps + 1
        while PixelFlowScheduler(count, self.num_stages, self.gamma).stages_with_one_timestep():
            count += 1
        return count

    def stage_timestep_range(self, stage: int) -> tuple[float, float]:
        """First and last model timestep of a stage (the dopri5 sampler maps t in [0, 1] onto it)."""
        table = self.timesteps_per_stage[stage]
        return float(table[0]), float(table[-1])

    def set_timesteps(self, num_inference_steps: int, stage: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Sampling grid of one stage: (model timesteps (n,), times t (n+1,) ending at 1.0), float64,
        for num_inference_steps = n Euler steps of stage `stage` in [0, num_stages), with the time
        shift `shift` (> 0; 1: none)."""
        num_inference_steps = integer("num_inference_steps", num_inference_steps, where="")
        stage = integer("stage", stage, where="")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {stage}")
        shift = np.asarray(shift).item() if np.ndim(shift) == 0 else shift  # numpy and jax scalars are numbers
        # 0 gave NaN timesteps, a negative shift ones far outside [0, T), a string math.isfinite's TypeError
        if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite positive number, got {shift!r}")
        T_start, T_end = self.stage_timestep_range(stage)
        t_start = float(self.t_window_per_stage[stage][0])
        t_end = float(self.t_window_per_stage[stage][-1])

        t = np.linspace(t_start, t_end, num_inference_steps, dtype=np.float64)
        t = t / (shift + (1 - shift) * t)
        slope = (T_end - T_start) / (t_end - t_start)
        timesteps = slope * t + (T_start - t_start * slope)
        return timesteps, np.append(t, 1.0)
