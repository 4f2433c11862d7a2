"""WORKDIR/run_config.json: the model a workdir trains (architecture, stages, timesteps,
resolution) and, for text, the T5 encoder its cross-attention learned. A workdir trains one of
each; resuming with another would load mismatched weights, so another is refused once a step is
saved (before that, a corrected first start records its own).
"""

from __future__ import annotations

import jax
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.run_checkpoint import CHECKPOINTS, RUN_CONFIG, complete_steps, read_run_config
from pixelflow_jax.config import ARCHITECTURE_OPTIONS_OFF, ModelConfig
from pixelflow_jax.training.metrics_log import WRITE_RERUN


def write_run_record(path: str, value) -> None:
    """One of the run's small JSON records (process 0), written whole; a failure (a full disk, a
    folder made read-only) is one error naming the file and the fix."""
    with storage.writing(path, WRITE_RERUN):
        storage.write_json_atomically(path, value)


def differences(there: dict, here: dict, prefix: str = "") -> list[str]:
    """'KEY THERE there, HERE in this config' for every entry that differs, nested dicts entry by
    entry; an entry one side lacks is 'absent' there (an architecture option named only when on:
    its off value)."""
    lines = []
    for key in sorted(set(there) | set(here)):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif key not in there or key not in here or a != b:
            lacking = repr(ARCHITECTURE_OPTIONS_OFF[key]) if key in ARCHITECTURE_OPTIONS_OFF else "absent"
            shown = [repr(side[key]) if key in side else lacking for side in (there, here)]
            lines.append(f"{prefix}{key} {shown[0]} there, {shown[1]} in this config")
    return lines


def check_run_config(workdir: str, model_cfg: ModelConfig, config, text_encoder: dict | None = None, *,
                     record: bool = True) -> None:
    """A workdir trains one architecture (and, for text, one text encoder); resuming with another
    would load mismatched weights. With record=False (before the text encoder is known and built
    in the workdir) the rest is checked and nothing is written."""
    path = storage.join(workdir, RUN_CONFIG)
    current = {"architecture": model_cfg.architecture(), "num_stages": config.scheduler.num_stages,
               "num_train_timesteps": config.scheduler.num_train_timesteps, "resolution": config.data.resolution,
               **({"text_encoder": text_encoder} if text_encoder else {})}
    if storage.exists(path) and not complete_steps(workdir):
        # A start that failed before its first save (out of memory at the first step, say): no
        # weights to mismatch, so the corrected command records its model in place of that one.
        recorded = read_run_config(workdir)
        if record and recorded != current and jax.process_index() == 0:
            logging.warning("%s: no step of the run it records was saved; recorded anew for this config (%s)",
                            path, "; ".join(differences(recorded, current)))
            write_run_record(path, current)
    elif storage.exists(path):
        recorded = read_run_config(workdir)
        previous = {k: v for k, v in recorded.items() if k != "text_encoder"}
        if record and "text_encoder" in recorded:
            earlier = recorded["text_encoder"]
            # Found at another path, changed in place (allowed), or another token length (an allowed
            # resume change): the same encoder, recorded anew below.
            accepted = text_encoder and (changed_in_place(earlier, text_encoder, config)
                                         or same_encoder(earlier, text_encoder))
            previous["text_encoder"] = text_encoder if accepted else earlier
        if previous != current:
            # Its weights still start a new run of the same architecture (another resolution, stage or
            # timestep count: fine-tuning); another architecture does not load them.
            start_from = ("" if previous.get("architecture") != current["architecture"] else
                          f", with --config.train.init_from={workdir} to start from its weights")
            raise ValueError(f"{workdir} holds a run of a different model: "
                             f"{'; '.join(differences(previous, current))}. Use a new --workdir{start_from}")
        if record and recorded != current and jax.process_index() == 0:
            logging.info("%s: the text encoder recorded anew as %s", path, text_encoder)
            write_run_record(path, current)
    elif storage.listdir(storage.join(workdir, CHECKPOINTS)):
        raise ValueError(f"{workdir} holds {CHECKPOINTS}/ but no {RUN_CONFIG}: not a training run of pixelflow-jax, "
                         f"or a copy of one that missed that file (copy {RUN_CONFIG} from the run, then rerun to "
                         "resume it); otherwise use a new --workdir")
    elif record and jax.process_index() == 0:
        write_run_record(path, current)


def changed_in_place(recorded: dict | None, current: dict, config) -> bool:
    """Whether the run's encoder folder is where it was but its fingerprint changed. Refused, unless
    train.allow_resume_changes says the weights are the same (a re-saved config.json, another
    weight format added beside the first)."""
    if not recorded or recorded["path"] != current["path"] or not recorded.get("fingerprint") or \
            recorded["fingerprint"] == current["fingerprint"]:
        return False
    if not config.train.get("allow_resume_changes"):
        raise ValueError(f"the text encoder folder {current['path']} changed since the run recorded it (other "
                         "weights, a new download, a re-saved config): its cross-attention learned the old "
                         "embeddings. Restore the folder, or use a new --workdir; if the weights are the same, set "
                         "--config.train.allow_resume_changes=True to record the folder as it is now")
    logging.warning("the text encoder folder %s changed since the run recorded it; recorded anew "
                    "(train.allow_resume_changes)", current["path"])
    return True


def same_encoder(recorded: dict | None, current: dict) -> bool:
    """Whether the encoder a run recorded is `current` (a record): the same path, or the same
    folder fingerprint at another path (moved, another machine's download, or the run's own folder
    spelled absolute). Runs recorded before fingerprints compare by path. The token length is a
    training setting (resume_settings), not part of the encoder."""
    if not recorded:
        return False
    if recorded.get("fingerprint") and current.get("fingerprint"):
        return recorded["fingerprint"] == current["fingerprint"]
    return recorded["path"] == current["path"]
