"""The files one mode leaves in a workdir and another reads there: a sampling job's samples.npz
and samples/settings.json (an evaluation checks that the job finished), an evaluation's
eval.json (a sampling job's earlier output), and a training run's training_runs.jsonl (inspect
summarises it). Named here, so that neither mode imports the other."""

from __future__ import annotations

from pixelflow_jax import storage

SAMPLES_NPZ = "samples.npz"  # every image of a sampling job, for evaluation
EVAL_JSON = "eval.json"  # the latest evaluation (its history beside it)
SETTINGS_JSON = "settings.json"  # in the samples folder: what its job was asked for
TRAINING_RUNS = "training_runs.jsonl"  # a line per training job started in a run (inspect reads it)


def settings_path(workdir: str) -> str:
    """What the workdir's sampling job was asked for (sampling/job_settings.py)."""
    return storage.join(workdir, "samples", SETTINGS_JSON)
