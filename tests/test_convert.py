"""convert_torch_ckpt.py end to end: round trips, the accepted input formats, and every error path."""

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import traverse_util

from conftest import REPO, c2i_config, fixture_dir, json_edited, run_converter, t2i_config
from pixelflow_jax import load_model
from pixelflow_jax.config import ModelConfig
from test_model_parity import PARITY_RTOL, forward, relative_error


def release_state_dict(name="c2i_tiny"):
    return torch.load(os.path.join(fixture_dir(name), "model.pt"), weights_only=True)


def assert_failed_cleanly(result, output, *phrases):
    """Non-zero exit, a one-line 'error:' message naming the problem, no traceback, nothing written."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert not os.path.exists(output)
    leftovers = [f for f in os.listdir(os.path.dirname(output)) if f.startswith(f".{os.path.basename(output)}.")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("name", ["c2i_tiny", "t2i_tiny"])
def test_round_trip_reproduces_every_tensor(converted, tmp_path, name):
    back = tmp_path / "back"
    result = run_converter("--to_torch", f"--jax_checkpoint={converted[name]}", f"--output={back}")
    assert result.returncode == 0, result.stderr
    original = release_state_dict(name)
    exported = torch.load(back / "model.pt", weights_only=True)
    assert list(exported) == list(original)  # same keys, in the release's order
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    release_config = yaml.safe_load(open(os.path.join(fixture_dir(name), "config.yaml")))
    exported_config = yaml.safe_load(open(back / "config.yaml"))
    assert exported_config["model"] == release_config["model"]
    assert exported_config["data"]["resolution"] == release_config["data"]["resolution"]
    for key in ("num_train_timesteps", "num_stages"):
        assert exported_config["scheduler"][key] == release_config["scheduler"][key]


# torch key, index there -> NNX path, index there: one weight of each layout rule (a Linear's
# transpose, the patch embedding's (ph, pw, c) rows, the layer axis, an embedding table and a norm
# left as they are).
ONE_WEIGHT_EACH = {
    ("patch_embed.proj.weight", (9, 2, 1, 3)): (("patch_embed", "proj", "kernel"), ((1 * 4 + 3) * 3 + 2, 9)),
    ("transformer_blocks.1.mlp.fc1.weight", (100, 7)): (("transformer_blocks", "mlp", "fc1", "kernel"), (1, 7, 100)),
    ("transformer_blocks.0.attn1.q_proj.weight", (3, 5)): (("transformer_blocks", "attn1", "q_proj", "kernel"),
                                                           (0, 5, 3)),
    ("class_embedder.embedding_table.weight", (1000, 4)): (("class_embedder", "embedding_table", "embedding"),
                                                           (1000, 4)),
    ("transformer_blocks.1.norm3.weight", (6,)): (("transformer_blocks", "norm3", "weight"), (1, 6)),
    ("proj_out_2.bias", (47,)): (("proj_out_2", "bias"), (47,)),
}


def test_each_weight_lands_where_the_other_side_reads_it_in_either_direction():
    """A round trip passes a mapping that is wrong the same way both ways (a square kernel left
    untransposed, a patch's rows and columns swapped, the layers reversed): one marked weight of
    each layout rule, read at its own place on the other side, each direction on its own."""
    from pixelflow_jax.checkpoints.convert import param_shapes, params_to_torch, torch_to_params
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    config, state_dict = read_release_checkpoint(fixture_dir("c2i_tiny"))
    blank_torch = {key: np.zeros_like(value) for key, value in state_dict.items()}
    blank_params = {path: np.zeros(shape, np.float32) for path, shape in param_shapes(config.model).items()}
    for number, ((key, at), (path, place)) in enumerate(ONE_WEIGHT_EACH.items(), 1):
        blank_torch[key][at] = number
        blank_params[path][place] = number
    params = traverse_util.flatten_dict(torch_to_params(blank_torch, config.model))
    exported = params_to_torch(traverse_util.unflatten_dict(blank_params), config.model)
    for number, ((key, at), (path, place)) in enumerate(ONE_WEIGHT_EACH.items(), 1):
        assert params[path][place] == number and np.count_nonzero(params[path]) == 1, (key, path)
        assert exported[key][at] == number and np.count_nonzero(exported[key]) == 1, (path, key)
    assert all(array.flags.c_contiguous for array in exported.values())  # as torch.save and safetensors expect
    assert list(exported) == list(state_dict)  # the release's order


def test_a_conversion_reports_its_progress_in_tensors_and_gives_the_parameter_dtype_asked_for():
    """Progress counts the state dict's tensors up to all of them (a bar of 49 tensors, not of the
    32 stacked parameters); the parameters come in the config's param_dtype."""
    import jax.numpy as jnp

    from pixelflow_jax.checkpoints.convert import torch_to_params
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    config, state_dict = read_release_checkpoint(fixture_dir("c2i_tiny"))
    reports = []
    model = dataclasses.replace(config.model, param_dtype="bfloat16")
    params = traverse_util.flatten_dict(torch_to_params(state_dict, model, progress=lambda *r: reports.append(r)))
    assert reports[-1] == (49, 49) and {total for _, total in reports} == {49}
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert {leaf.dtype for leaf in params.values()} == {jnp.dtype(jnp.bfloat16)}
    kernel = params[("transformer_blocks", "mlp", "fc1", "kernel")][1]
    np.testing.assert_array_equal(kernel, state_dict["transformer_blocks.1.mlp.fc1.weight"].T.astype(jnp.bfloat16))


def test_the_parameters_given_for_an_export_are_checked_against_the_architecture():
    """params_to_torch names every missing, extra or mis-shaped parameter (dropped, a KeyError, an
    extra ignored without a word, or a reshape error), as torch_to_params names those of a state dict."""
    from pixelflow_jax.checkpoints.convert import (ConversionError, param_shapes, params_to_torch,
                                                   torch_to_params)
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    config, state_dict = read_release_checkpoint(fixture_dir("c2i_tiny"))
    params = {path: np.zeros(shape, np.float32) for path, shape in param_shapes(config.model).items()}
    changes = [
        (lambda p: p.pop(("proj_out_2", "bias")), r"missing keys .*\(1\):\n    proj_out_2\.bias$"),
        (lambda p: p.update({("pos_embed", "freqs"): np.zeros(3)}), r"unexpected keys .*\(1\):\n    pos_embed\.freqs$"),
        (lambda p: p.update({("proj_out_1", "kernel"): np.zeros((32, 63))}),
         r"shape mismatches .*\(1\):\n    proj_out_1\.kernel: \(32, 63\) vs \(32, 64\)$"),
    ]
    for change, message in changes:
        changed = dict(params)
        change(changed)
        with pytest.raises(ConversionError, match=message):
            params_to_torch(traverse_util.unflatten_dict(changed), config.model)
    for key, shape, message in (("proj_out_2.bias", (47,), r"proj_out_2\.bias: \(47,\) vs \(48,\)"),
                                ("transformer_blocks.1.norm3.weight", (31,),
                                 r"transformer_blocks\.1\.norm3\.weight: \(31,\) vs \(32,\)")):
        with pytest.raises(ConversionError, match=r"shape mismatches .*\(1\):\n    " + message + "$"):
            torch_to_params({**state_dict, key: np.zeros(shape, np.float32)}, config.model)


def test_an_export_lists_the_tensors_in_the_releases_order_past_ten_layers_and_with_cross_attention():
    """The release registers layer 10 after layer 9 (as its 28-layer models save them), not after
    layer 1 as the keys sort as text; a text model's attn2 comes between norm2 and norm3."""
    from pixelflow_jax.checkpoints.convert import param_shapes, params_to_torch, torch_to_params
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    model = ModelConfig.from_mapping(dict(num_attention_heads=1, attention_head_dim=8, depth=11, patch_size=2,
                                          in_channels=3, out_channels=3, num_classes=2))
    params = {path: np.zeros(shape, np.float32) for path, shape in param_shapes(model).items()}
    layers = [int(key.split(".")[1]) for key in params_to_torch(traverse_util.unflatten_dict(params), model)
              if key.startswith("transformer_blocks.")]
    assert layers == sorted(layers) and layers[-1] == 10
    config, state_dict = read_release_checkpoint(fixture_dir("t2i_tiny"))
    assert list(params_to_torch(torch_to_params(state_dict, config.model), config.model)) == list(state_dict)


def test_bare_state_dict_with_shapes_inferred(tmp_path, golden):
    output = tmp_path / "out"
    weights = tmp_path / "model.pt"  # no config.yaml beside it
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), weights)
    result = run_converter(f"--torch_checkpoint={weights}", f"--output={output}")
    assert_failed_cleanly(result, str(output), "--attention_head_dim")
    result = run_converter(f"--torch_checkpoint={weights}", "--attention_head_dim=16", "--resolution=64",
                           f"--output={output}")
    assert result.returncode == 0 and "no config.yaml gives the resolution" not in result.stderr, result.stderr
    model, config = load_model(str(output))
    assert config.model.num_attention_heads == 2 and config.model.depth == 2 and config.resolution == 64
    assert relative_error(forward(model, golden["c2i_tiny"], 3), golden["c2i_tiny"]["fwd_3_out"]) <= PARITY_RTOL
    with open("/dev/full", "w") as full:  # its log on a full disk as well: the last line is lost, not the result
        result = run_converter(f"--torch_checkpoint={weights}", "--attention_head_dim=16",
                               f"--output={tmp_path / 'guess'}", stdout=full)
    assert result.returncode == 0 and "no config.yaml gives the resolution, so 256 px is assumed (the release's); " \
                                      "pass --resolution" in result.stderr, result.stderr  # was silent
    assert "stdout cannot be written" in result.stderr and (tmp_path / "guess" / "pixelflow_config.json").exists()


def test_a_bare_state_dict_says_which_schedule_it_is_given(tmp_path, caplog):
    """Weights alone hold neither the number of stages nor of timesteps: a bare state dict of a
    3-stage run was converted as 4 stages without a word (only a config.yaml cut short said so)."""
    import logging

    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    weights = tmp_path / "ema.pt"
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), weights)
    warning = (f"{weights}: no config.yaml gives scheduler.num_stages / num_train_timesteps: num_stages 4, "
               "num_train_timesteps 1000 assumed (the release's); pass --num_stages / --num_train_timesteps to set "
               "them")
    with caplog.at_level(logging.WARNING):
        config, _ = read_release_checkpoint(str(weights), attention_head_dim=16, overrides={"resolution": 64})
    assert config.num_stages == 4 and warning in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config, _ = read_release_checkpoint(str(weights), attention_head_dim=16, overrides={
            "resolution": 64, "num_stages": 3, "num_train_timesteps": 1000})
    assert config.num_stages == 3 and not caplog.text, caplog.text


def test_a_flag_that_a_config_yaml_decides_is_refused_unless_it_agrees():
    """--resolution / --num_stages / --num_train_timesteps fill what a config.yaml leaves out; where
    it gives them, it describes the weights, so another value is a mistake named with both values
    (the config's value winning without a word, or a flag of the same value refused, would pass)."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import config_from_release_yaml, release_config

    path = os.path.join(fixture_dir("c2i_tiny"), "config.yaml")  # data.resolution 64, 4 stages, 1000 timesteps
    params, extras = config_from_release_yaml(path)
    with pytest.raises(CheckpointError, match=re.escape(f"--resolution=128 (64 in {path}), --num_stages=3 (4 in "
                                                        f"{path}): the config.yaml decides these; drop the flags")):
        release_config(params, extras, {"resolution": 128, "num_stages": 3, "num_train_timesteps": 1000}, "w.pt",
                       path)
    agreeing = release_config(params, extras, {"resolution": 64, "num_stages": 4, "num_train_timesteps": None},
                              "w.pt", path)
    assert (agreeing.resolution, agreeing.num_stages, agreeing.num_train_timesteps) == (64, 4, 1000)


def test_a_resolution_without_whole_patch_grids_names_where_it_came_from_and_a_fitting_value(tmp_path):
    """A bare state dict of patch 3 converted with --attention_head_dim alone stopped on "resolution 256
    must be a multiple of patch_size x 2^(num_stages-1) = 24": a value the user never gave (the
    release's default, assumed) and no flag or value that fits; a --resolution of the wrong multiple
    named no flag either. A config.yaml's own value is its file's to correct."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import release_config

    params = dict(num_attention_heads=3, attention_head_dim=4, depth=1, patch_size=3, in_channels=3, out_channels=3,
                  num_classes=3)
    with pytest.raises(CheckpointError) as error:
        release_config(params, {}, {}, "w.pt", None)
    assert ("the release's 256 px, assumed as no config.yaml gives data.resolution, must be a multiple of patch_size "
            "3 x 2^(num_stages 4 - 1) = 24 so that every stage has a whole patch grid: pass --resolution=240 or "
            "--resolution=264 (the resolution the weights were trained at), or --num_stages") in str(error.value), str(error.value)
    with pytest.raises(CheckpointError) as error:
        release_config(params, {}, {"resolution": 10, "num_stages": 2}, "w.pt", None)
    assert "--resolution=10 must be a multiple of patch_size 3 x 2^(num_stages 2 - 1) = 6" in str(error.value)
    assert "pass --resolution=6 or --resolution=12" in str(error.value), str(error.value)
    with pytest.raises(CheckpointError) as error:
        release_config(params, {"resolution": 10, "num_stages": 2}, {}, "w.pt", "conf/config.yaml")
    assert ("data.resolution 10 in conf/config.yaml must be a multiple of patch_size 3 x 2^(num_stages 2 - 1) = 6 "
            "so that every stage has a whole patch grid: that config.yaml does not describe these weights; correct "
            "its data.resolution or scheduler.num_stages") in str(error.value), str(error.value)
    # A flag that agrees with the config.yaml: the file decides it (a --resolution offered would conflict with it).
    with pytest.raises(CheckpointError, match="data.resolution 10 in conf/config.yaml must be a multiple of .*: that "
                                              "config.yaml does not describe these weights"):
        release_config(params, {"resolution": 10, "num_stages": 2}, {"resolution": 10}, "w.pt", "conf/config.yaml")
    # The largest grid there is (LARGEST_IMAGE_SIDE, 4 x 2^14) is a resolution to offer, not too many stages.
    with pytest.raises(CheckpointError, match=re.escape("--resolution=256 must be a multiple of patch_size 4 x 2^("
                                                        "num_stages 15 - 1) = 65536 so that every stage has a whole "
                                                        "patch grid: pass --resolution=65536 ")):
        release_config({**params, "patch_size": 4}, {}, {"resolution": 256, "num_stages": 15}, "w.pt", None)
    # No stages or no resolution (off any grid): named by CheckpointConfig alone, as without patches of 3.
    for overrides, refusal in (({"resolution": -10, "num_stages": 2}, "resolution must be positive, got -10"),
                               ({"resolution": 10, "num_stages": 0}, "num_stages must be positive, got 0")):
        with pytest.raises(CheckpointError, match=f"^invalid architecture for w.pt: {refusal}$"):
            release_config(params, {}, overrides, "w.pt", None)
    assert release_config(params, {}, {"resolution": 12, "num_stages": 2}, "w.pt", None).resolution == 12


def test_a_damaged_tensor_that_the_architecture_is_read_from_is_named():
    """A 2-D patch embedding was an IndexError traceback, and a proj_out_2 of 5 rows was blamed on
    'model.out_channels must be positive', a setting the user never gave (5 // 16 = 0)."""
    from pixelflow_jax.checkpoints.convert import ConversionError, infer_architecture

    state = {key: tensor.numpy() for key, tensor in release_state_dict().items()}
    assert infer_architecture(state, 16)["out_channels"] == 3
    for key, shape in (("patch_embed.proj.weight", (32, 48)), ("patch_embed.proj.weight", (32, 3, 4, 2)),
                       ("patch_embed.proj.weight", (32, 3, 0, 0)),
                       ("proj_out_2.weight", (5, 5)), ("proj_out_2.weight", (0, 32)), ("proj_out_2.weight", (48,))):
        with pytest.raises(ConversionError, match=rf"{re.escape(key)} has shape {re.escape(str(shape))}, where a "
                                                  r"PixelFlow checkpoint"):
            infer_architecture({**state, key: np.zeros(shape, np.float32)}, 16)


def test_the_architecture_read_from_tensor_shapes():
    """Every value infer_architecture reads, for a class model, a text model and one without biases."""
    from pixelflow_jax.checkpoints.convert import infer_architecture

    state = lambda name: {key: value.numpy() for key, value in release_state_dict(name).items()}

    common = dict(num_attention_heads=4, attention_head_dim=8, depth=2, patch_size=4, in_channels=3, out_channels=3)
    assert infer_architecture(state("c2i_tiny"), 8) == dict(**common, num_classes=1000, attention_bias=True,
                                                             cross_attention_dim=0)
    assert infer_architecture(state("t2i_tiny"), 8) == dict(**common, num_classes=0, attention_bias=True,
                                                             cross_attention_dim=20)
    unbiased = {key: value for key, value in state("c2i_tiny").items() if not re.search(r"attn1\.\w_proj\.bias", key)}
    assert infer_architecture(unbiased, 8)["attention_bias"] is False


def test_a_release_folders_model_pt_named_alone_is_described_by_the_folders_config_yaml(tmp_path):
    """main.py reads FOLDER/model.pt as the folder; the converter recorded 256 px instead of the
    config.yaml's 64 (or asked for --attention_head_dim), silently."""
    output = tmp_path / "out"
    result = run_converter(f"--torch_checkpoint={os.path.join(fixture_dir('c2i_tiny'), 'model.pt')}",
                           f"--output={output}")
    assert result.returncode == 0, result.stderr
    _, config = load_model(str(output))
    assert config.resolution == 64 and config.model.attention_head_dim == 16

    other = tmp_path / "other_project"  # a bare state dict beside another project's config.yaml
    other.mkdir()
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), other / "model.pt")
    (other / "config.yaml").write_text("optimizer: adam\n")
    result = run_converter(f"--torch_checkpoint={other / 'model.pt'}", "--attention_head_dim=16",
                           f"--output={tmp_path / 'out2'}")
    assert result.returncode == 0, result.stderr
    assert "config.yaml is not a release config.yaml (no model.params): not used" in result.stderr

    # --torch_config beside a folder with its own config.yaml: a 3-stage file converted 4-stage
    # weights as 3 stages without a word.
    three_stages = tmp_path / "three_stages.yaml"
    three_stages.write_text(open(os.path.join(fixture_dir("c2i_tiny"), "config.yaml")).read().replace(
        "num_stages: 4", "num_stages: 3"))
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--torch_config={three_stages}",
                           f"--output={tmp_path / 'out3'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"--torch_config {three_stages} disagrees with {os.path.join(fixture_dir('c2i_tiny'), 'config.yaml')}, "
            "the folder's own config (differing: num_stages): drop --torch_config") in result.stderr
    assert not (tmp_path / "out3").exists()


def test_text_to_image_folder_without_config_yaml(tmp_path, golden):
    """The release's text-to-image folder has model.pt but no config.yaml: shapes give cross-attention
    (20 wide here) and no class table; resolution defaults to the release's 1024 for text models."""
    release = tmp_path / "t2i_release"
    release.mkdir()
    os.symlink(os.path.join(fixture_dir("t2i_tiny"), "model.pt"), release / "model.pt")
    output = tmp_path / "out"
    result = run_converter(f"--torch_checkpoint={release}", "--attention_head_dim=16", f"--output={output}")
    assert result.returncode == 0, result.stderr
    model, config = load_model(str(output))
    assert (config.model.cross_attention_dim, config.model.num_classes, config.resolution) == (20, 0, 1024)
    assert relative_error(forward(model, golden["t2i_tiny"], 2), golden["t2i_tiny"]["fwd_2_out"]) <= PARITY_RTOL


def test_train_checkpoint_takes_ema_by_default(tmp_path, golden):
    """Which of the two sets is converted is said and recorded (the two folders were told apart by
    nothing), in the words of an export's note, which inspect and the demo page show."""
    from pixelflow_jax.checkpoints.checkpoint import read_record

    model_weights = release_state_dict()
    ema_weights = {k: v.clone() for k, v in model_weights.items()}
    model_weights = {k: v * 0.5 for k, v in model_weights.items()}
    checkpoint = tmp_path / "model_1000.pt"
    torch.save({"model": model_weights, "ema": ema_weights, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(config="c.yaml", output_dir="exp")}, checkpoint)
    config = os.path.join(fixture_dir("c2i_tiny"), "config.yaml")
    outputs = {}
    for weights in ("ema", "model"):
        outputs[weights] = tmp_path / weights
        result = run_converter(f"--torch_checkpoint={checkpoint}", f"--torch_config={config}",
                               f"--weights={weights}", f"--output={outputs[weights]}")
        assert result.returncode == 0, result.stderr
        which = ("the EMA (--weights=ema)" if weights == "ema" else
                 "the raw weights, not their EMA (--weights=model),")
        note = f"weights: {which} of the train.py checkpoint model_1000.pt"
        assert result.stdout.rstrip().endswith(f"4 stages; {note}"), result.stdout
        assert read_record(str(outputs[weights])).weights_note == note
    g = golden["c2i_tiny"]
    assert relative_error(forward(load_model(str(outputs["ema"]))[0], g, 1), g["fwd_1_out"]) <= PARITY_RTOL
    assert relative_error(forward(load_model(str(outputs["model"]))[0], g, 1), g["fwd_1_out"]) > 1e-2


def test_a_train_checkpoint_is_described_by_the_config_yaml_train_py_wrote_beside_it(tmp_path):
    """train.py writes config.yaml and model_STEP.pt into one output folder; the converter read the
    checkpoint without it: an error asking for --torch_config, or with the README's --attention_head_dim
    a 3-stage 64 px run converted as 4 stages at 256 px."""
    run = tmp_path / "exp0001"
    run.mkdir()
    (run / "config.yaml").write_text(open(os.path.join(fixture_dir("c2i_tiny"), "config.yaml")).read().replace(
        "num_stages: 4", "num_stages: 3"))
    weights = release_state_dict()
    torch.save({"model": weights, "ema": weights, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(config="c.yaml", output_dir=str(run))}, run / "model_2000.pt")
    for extra in ((), ("--attention_head_dim=16",)):
        output = tmp_path / f"out{len(extra)}"
        result = run_converter(f"--torch_checkpoint={run / 'model_2000.pt'}", *extra, f"--output={output}")
        assert result.returncode == 0 and "is assumed" not in result.stderr, result.stderr
        _, config = load_model(str(output))
        assert (config.num_stages, config.resolution, config.model.attention_head_dim) == (3, 64, 16)


def test_a_release_folder_holding_a_train_checkpoint_reads_the_weights_asked_for(tmp_path):
    """load_model's weights= covers the release's train.py checkpoints in a release folder too, not
    only runs; a release folder's bare state dict has no 'model' set to give."""
    from pixelflow_jax.api import read_checkpoint, resolve_checkpoint
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    ema_weights = release_state_dict()
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "config.yaml"), release)
    torch.save({"model": {k: v * 0.5 for k, v in ema_weights.items()}, "ema": ema_weights}, release / "model.pt")
    source = resolve_checkpoint(str(release))
    ema, model = (jax.tree.leaves(read_checkpoint(source, weights)[1]) for weights in ("ema", "model"))
    for e, m in zip(ema, model):
        np.testing.assert_allclose(m, e * 0.5, rtol=1e-6)
    with pytest.raises(CheckpointError, match="holds one set of weights"):
        read_checkpoint(resolve_checkpoint(fixture_dir("c2i_tiny")), "model")


def test_a_train_checkpoint_without_the_weights_asked_for_or_a_head_dim_against_the_config_is_named():
    """A train.py checkpoint without the set asked for names the one it has (not a KeyError), and a
    tensor named 'model' is no such checkpoint; --attention_head_dim against the config.yaml is named
    (the config.yaml's value was taken without a word)."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import extract_state_dict, read_release_checkpoint

    weights = release_state_dict()
    with pytest.raises(CheckpointError, match=r"w.pt is a training checkpoint without 'ema' weights; it has "
                                              r"\['model', 'opt'\]: pass --weights=model"):
        extract_state_dict({"model": weights, "opt": {}}, "w.pt")
    # saved empty by a run without an EMA: it was "no PixelFlow state dict ...; it holds NoneType"
    for empty, words in ((None, "None"), ({}, "no tensors")):
        with pytest.raises(CheckpointError, match=rf"^w.pt is a training checkpoint whose 'ema' weights are empty "
                                                  rf"\({words}\): pass --weights=model$"):
            extract_state_dict({"model": weights, "ema": empty}, "w.pt")
    with pytest.raises(CheckpointError, match=r"whose 'model' weights are empty \(no tensors\): pass --weights=ema$"):
        extract_state_dict({"model": {}, "ema": weights}, "w.pt", "model")
    one = {"model": torch.zeros(2)}  # a tensor named model, not train.py's dict of weights
    assert list(extract_state_dict(one, "w.pt")) == ["model"]
    with pytest.raises(CheckpointError, match=r"--attention_head_dim=8 disagrees with .*config.yaml "
                                              r"\(attention_head_dim: 16\)"):
        read_release_checkpoint(fixture_dir("c2i_tiny"), attention_head_dim=8)


def test_the_demo_page_names_the_raw_weights_of_a_train_checkpoint_in_a_release_folder(tmp_path):
    """A release folder holding a train.py checkpoint has two sets, as a run does: served for
    'model', the page says so (a converted folder's one set is served without a claim)."""
    from configs import c2i
    from pixelflow_jax.demo_app import DemoSampler, page_heading

    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "config.yaml"), release)
    weights = release_state_dict()
    torch.save({"model": {k: v * 0.5 for k, v in weights.items()}, "ema": weights}, release / "model.pt")
    config = c2i.get_config("tiny")
    config.sample.update(checkpoint=str(release), weights="model")
    assert page_heading(DemoSampler(config, str(tmp_path / "page")), "model").endswith(f"`{release}` (model weights)")


def test_the_export_of_a_train_checkpoint_for_model_names_the_weights_it_wrote(tmp_path):
    """A release folder's train.py checkpoint holds two sets, as a run does: its export for 'model'
    says so, as sampling and the demo page do (it named the folder alone)."""
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "config.yaml"), release)
    weights = release_state_dict()
    torch.save({"model": {k: v * 0.5 for k, v in weights.items()}, "ema": weights}, release / "model.pt")
    result = run_converter("--to_torch", f"--jax_checkpoint={release}", "--weights=model",
                           f"--output={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(f"tensors from the model weights of {release}"), result.stdout
    exported = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    torch.testing.assert_close(exported["proj_out_2.weight"], weights["proj_out_2.weight"] * 0.5)


def _save_variant(tmp_path, state_dict):
    path = tmp_path / "variant.pt"
    torch.save(state_dict, path)
    return str(path)


@pytest.mark.parametrize("case", ["missing_key", "extra_key", "wrong_shape"])
def test_state_dict_problems_are_named(tmp_path, case):
    state_dict = release_state_dict()
    if case == "missing_key":
        del state_dict["transformer_blocks.1.attn1.k_norm.weight"]
        phrases = ["missing keys", "transformer_blocks.1.attn1.k_norm.weight"]
    elif case == "extra_key":
        state_dict["pos_embed.freqs"] = torch.zeros(3)
        phrases = ["unexpected keys", "pos_embed.freqs"]
    else:
        state_dict["transformer_blocks.0.mlp.fc1.weight"] = torch.zeros(100, 32)
        phrases = ["shape mismatches", "transformer_blocks.0.mlp.fc1.weight: (100, 32) vs (128, 32)"]
    output = str(tmp_path / "out")
    config = os.path.join(fixture_dir("c2i_tiny"), "config.yaml")
    result = run_converter(f"--torch_checkpoint={_save_variant(tmp_path, state_dict)}", f"--torch_config={config}",
                           f"--output={output}")
    assert_failed_cleanly(result, output, *phrases)


SHAPES_FIX = "describe them with the config.yaml they came with, or correct these values in it"


@pytest.mark.parametrize("change,phrases", [  # the values the weights' shapes give, with the fix
    ({"depth": 3}, ["missing keys", "transformer_blocks.2.norm1.linear.weight",
                    f"the weights' shapes give depth 2 where the architecture has depth 3: {SHAPES_FIX}"]),
    ({"num_attention_heads": 4}, ["shape mismatches", "patch_embed.proj.weight: (32, 3, 4, 4) vs (64, 3, 4, 4)",
                                 "give num_attention_heads 2 where the architecture has num_attention_heads 4"]),
    ({"num_classes": 10}, ["class_embedder.embedding_table.weight: (1001, 32) vs (11, 32)",
                           "give num_classes 1000 where the architecture has num_classes 10"]),
    ({"patch_size": 2, "attention_bias": False},
     ["give patch_size 4, attention_bias True where the architecture has patch_size 2, attention_bias False"]),
])
def test_config_that_disagrees_with_weights(tmp_path, change, phrases):
    folder = tmp_path / "release"
    shutil.copytree(fixture_dir("c2i_tiny"), folder)
    config = yaml.safe_load(open(folder / "config.yaml"))
    config["model"]["params"].update(change)
    yaml.safe_dump(config, open(folder / "config.yaml", "w"))
    output = str(tmp_path / "out")
    assert_failed_cleanly(run_converter(f"--torch_checkpoint={folder}", f"--output={output}"), output, *phrases)


def test_a_text_models_weights_under_a_class_config_and_the_other_way_round_say_so():
    """Only the 22 attn2 keys and the class table were listed, as for any other mismatch."""
    from pixelflow_jax.checkpoints.convert import ConversionError, torch_to_params
    from pixelflow_jax.checkpoints.torch_io import config_from_release_yaml
    from pixelflow_jax.config import ModelConfig

    for weights, config, phrase in (("t2i_tiny", "c2i_tiny", r"the weights have cross-attention \(attn2: a "
                                                             r"text-to-image model\) and the architecture has none"),
                                    ("c2i_tiny", "t2i_tiny", r"the weights have no cross-attention \(attn2: not a "
                                                             r"text-to-image model\) and the architecture has it")):
        state_dict = {k: v.numpy() for k, v in release_state_dict(weights).items()}
        params, _ = config_from_release_yaml(os.path.join(fixture_dir(config), "config.yaml"))
        with pytest.raises(ConversionError, match=phrase + r" .*: describe them with their own config.yaml"):
            torch_to_params(state_dict, ModelConfig.from_mapping(params))


def test_a_long_list_of_mismatches_shows_twenty_and_counts_the_rest():
    """Weights of another width mismatch in nearly every tensor: the refusal gives their count, the
    first 20 of them, and how many more (the count of those left out was not checked)."""
    from pixelflow_jax.checkpoints.convert import ConversionError, torch_to_params
    from pixelflow_jax.checkpoints.torch_io import config_from_release_yaml
    from pixelflow_jax.config import ModelConfig

    state_dict = {k: v.numpy() for k, v in release_state_dict().items()}
    params, _ = config_from_release_yaml(os.path.join(fixture_dir("c2i_tiny"), "config.yaml"))
    with pytest.raises(ConversionError) as error:
        torch_to_params(state_dict, ModelConfig.from_mapping({**params, "num_attention_heads": 4}))
    header, *listing, shapes_give = str(error.value).split("shape mismatches ")[1].splitlines()
    count = int(re.fullmatch(r"\(key: checkpoint shape vs architecture shape\) \((\d+)\):", header)[1])
    assert count > 21 and len(listing) == 21, str(error.value)
    assert all(re.fullmatch(r"    [\w.]+: \([\d, ]+\) vs \([\d, ]+\)", line) for line in listing[:20]), listing
    assert listing[-1] == f"    ... and {count - 20} more"
    assert shapes_give.startswith("  the weights' shapes give num_attention_heads 2 where"), shapes_give


@pytest.mark.parametrize("content", ["truncated", "text", "numpy"])
def test_unreadable_file_gets_one_line_error(tmp_path, content):
    path = tmp_path / "model.pt"
    data = open(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), "rb").read()
    if content == "numpy":  # a pickle the safe unpickler refuses
        with open(path, "wb") as f:
            np.save(f, np.zeros(3), allow_pickle=False)
    else:
        path.write_bytes(data[: len(data) // 2] if content == "truncated" else b"not a checkpoint\n")
    output = str(tmp_path / "out")
    result = run_converter(f"--torch_checkpoint={path}", "--attention_head_dim=16", f"--output={output}")
    assert_failed_cleanly(result, output, "cannot read", "truncated or not a checkpoint")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "weights_only" not in result.stderr  # torch's advice to unpickle with code execution is not passed on


@pytest.mark.parametrize("head_dim,overrides,phrase", [
    (0, {}, "attention_head_dim must be a positive number of channels per head, got 0"),  # was a ZeroDivisionError
    (-8, {}, "attention_head_dim must be a positive number of channels per head, got -8"),  # was 'does not divide'
    (5, {}, "attention_head_dim 5 does not divide the model width 32"),
    (16, {"num_stages": 0}, "num_stages must be positive, got 0"),
    (16, {"resolution": -64}, "resolution must be positive, got -64"),
    # the least resolution for 100 stages is 4 x 2^99 px: it was printed as a 31-digit multiple
    (16, {"num_stages": 100}, "num_stages 100 is far too many: each stage halves the image, so the full image must "
                              "be at least 4 (the patch size) x 2^99 px for the first stage to hold a whole patch: "
                              "resolution 256 holds at most 7; set num_stages to 7 or less"),
    (16, {"num_stages": 100, "resolution": 2}, "and resolution 2 is below even one stage's 4 px: raise it"),
    # stage 0 had no timestep of its own (start_t = end_t = 0), and sampled
    (16, {"num_train_timesteps": 3}, "num_train_timesteps 3 must be at least num_stages 4"),
])
def test_a_flag_out_of_range_is_the_converters_own_error(head_dim, overrides, phrase, tmp_path):
    """convert_torch_ckpt.py prints these errors (CheckpointError, ConversionError) as one line."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.convert import ConversionError
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    bare = str(tmp_path / "model.pt")  # no config.yaml beside it
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), bare)
    with pytest.raises((CheckpointError, ConversionError), match=re.escape(phrase)):
        read_release_checkpoint(bare, attention_head_dim=head_dim, overrides=overrides)


def test_an_output_that_must_not_or_cannot_be_written_is_refused_before_converting(tmp_path, converted):
    run = tmp_path / "run"
    (run / "checkpoints" / "5").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    for args, output, phrase in [
        ([f"--torch_checkpoint={fixture_dir('c2i_tiny')}"], run / "checkpoints" / "10000",
         "is inside the checkpoints of the training run"),  # the run's latest step, and rotated away
        (["--to_torch", f"--jax_checkpoint={converted['c2i_tiny']}"], run / "checkpoints" / "9",
         "is inside the checkpoints of the training run"),
        ([f"--torch_checkpoint={fixture_dir('c2i_tiny')}"], tmp_path / "a_file" / "out",
         "a_file is a file, not a folder"),
    ]:
        result = run_converter(*args, f"--output={output}")
        assert result.returncode != 0 and phrase in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not os.path.exists(output) and "converting" not in result.stderr  # refused before any work
    assert os.listdir(run / "checkpoints") == ["5"]


def test_release_defaults_fill_a_config_yaml_and_what_is_not_weights_is_refused(tmp_path, caplog):
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import config_from_release_yaml, extract_state_dict, release_config

    config = yaml.safe_load(open(os.path.join(fixture_dir("t2i_tiny"), "config.yaml")))
    del config["model"]["params"]["num_classes"]  # the release's default: 0, no class table
    yaml.safe_dump(config, open(tmp_path / "config.yaml", "w"))
    assert config_from_release_yaml(str(tmp_path / "config.yaml"))[0]["num_classes"] == 0
    params = config["model"]["params"]
    with caplog.at_level("WARNING"):  # a text model has no classes, and is not unconditional
        release_config({**params, "num_classes": 0}, {"resolution": 64}, None, "w.pt", None)
    assert "unconditional" not in caplog.text
    with caplog.at_level("WARNING"):  # and without cross-attention: a model nothing here samples or trains
        release_config({**params, "num_classes": 0, "cross_attention_dim": None}, {"resolution": 64}, None, "w.pt",
                       None)
    assert "w.pt is an unconditional model (no num_classes, no cross_attention_dim)" in caplog.text
    del config["model"]["params"]["depth"]  # no default in the release either
    yaml.safe_dump(config, open(tmp_path / "config.yaml", "w"))
    with pytest.raises(CheckpointError, match="lacks model.params depth, which the release's PixelFlowModel"):
        config_from_release_yaml(str(tmp_path / "config.yaml"))
    # --torch_config given the release folder, or its model.pt: a traceback (IsADirectoryError, UnicodeDecodeError).
    with pytest.raises(CheckpointError, match=r"config file .* is a folder: pass the release's config.yaml itself"):
        config_from_release_yaml(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"^config file .*/typo.yaml does not exist$"):  # --torch_config's typo
        config_from_release_yaml(str(tmp_path / "typo.yaml"))
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\x80\x02\xff")
    with pytest.raises(CheckpointError, match=r"model.pt is not a text file, so not a release config.yaml"):
        config_from_release_yaml(str(tmp_path / "model.pt"))
    # YAML's own message spans lines (a caret drawing): one line, with where the problem is.
    (tmp_path / "config.yaml").write_text("model:\n  params: [depth: 2\n")
    with pytest.raises(CheckpointError, match=r"config.yaml is not valid YAML \(expected ',' or '\]', but got "
                                              r"'<stream end>' at line 3, column 1\), so not a release config.yaml: "
                                              r"mend it, or pass the config.yaml that came with the checkpoint$"):
        config_from_release_yaml(str(tmp_path / "config.yaml"))

    weights = release_state_dict()
    wrapped = {f"module.{k}": v.double() for k, v in weights.items()}  # DistributedDataParallel's, in float64
    with caplog.at_level("WARNING"):
        unwrapped = extract_state_dict(wrapped, "w.pt")
    assert sorted(unwrapped) == sorted(weights) and "are float64, rounded to the float32" in caplog.text
    assert all((unwrapped[k] == v.numpy()).all() and unwrapped[k].dtype == np.float32 for k, v in weights.items())
    halved = extract_state_dict({k: v.bfloat16() for k, v in weights.items()}, "w.pt")  # widened exactly
    assert all((halved[k] == v.bfloat16().float().numpy()).all() and halved[k].dtype == np.float32
               for k, v in weights.items())
    key = "transformer_blocks.1.attn1.q_proj.weight"
    for change, message in [(lambda v: v.int(), f"w.pt: {key} hold torch.int32 values, not weights"),
                            (lambda v: v * float("nan"), f"w.pt: {key} hold NaN or inf values")]:
        with pytest.raises(CheckpointError, match=message):
            extract_state_dict({**weights, key: change(weights[key])}, "w.pt")


def test_a_file_with_python_objects_is_not_unpickled_and_says_so(tmp_path):
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import load_torch_file

    torch.save({**release_state_dict(), "step": argparse.ArgumentParser}, tmp_path / "model.pt")  # not data
    with pytest.raises(CheckpointError, match=r"holds Python objects besides tensors \(argparse.ArgumentParser\), "
                                              r"which are not read \(loading them could run code\)") as error:
        load_torch_file(str(tmp_path / "model.pt"))
    assert "\x1b" not in str(error.value)
    # torch.load refuses it with advice to load it with weights_only=False, which would run its code.
    torch.jit.script(torch.nn.Linear(2, 2)).save(tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match=r"scripted.pt is a TorchScript archive \(torch.jit.save\), which is "
                                              r"read by running its code: save the weights alone") as error:
        load_torch_file(str(tmp_path / "scripted.pt"))
    assert "weights_only" not in str(error.value)


def test_a_config_yaml_of_another_project_with_a_model_section_beside_model_pt_is_not_used(tmp_path, caplog):
    """Another project's config.yaml may have a model: section too; without model.params it does
    not describe the weights beside it (taken for the release's, it was refused: 'has no model.params')."""
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), tmp_path / "model.pt")
    (tmp_path / "config.yaml").write_text("model:\n  name: resnet50\n")
    with caplog.at_level("WARNING"):
        config, _ = read_release_checkpoint(str(tmp_path / "model.pt"), attention_head_dim=16,
                                            overrides={"resolution": 64})
    assert config.model.depth == 2 and "config.yaml is not a release config.yaml (no model.params): not used" in \
        caplog.text

def test_an_empty_torch_file_is_named_empty(tmp_path):
    """A download or save cut at its start: it was 'truncated or not a checkpoint?: EOFError'."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import load_torch_file

    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.pt is empty \(0 bytes\): a download or a save that did not "
                                              r"finish\? Fetch or save it again$"):
        load_torch_file(str(tmp_path / "model.pt"))


def test_a_torch_file_that_is_missing_or_a_folder_is_named_so(tmp_path):
    """Not 'cannot read ... (truncated or not a checkpoint?)', which sends the user looking for damage."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import load_torch_file

    for path, message in ((tmp_path / "none.pt", "none.pt does not exist$"), (tmp_path, "is not a file$")):
        with pytest.raises(CheckpointError, match=message):
            load_torch_file(str(path))


def test_a_t5_or_inception_torch_file_of_no_dict_of_tensors_is_named_so(tmp_path):
    """load_tensor_dict (a T5's pytorch_model.bin, pytorch-fid's weights): a list, or a dict with a
    step count beside its tensors, is refused by name (the check left out passed: the list's
    .items() and the int's .detach() were an AttributeError traceback)."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import load_tensor_dict

    for name, content in (("list.bin", [torch.zeros(2)]), ("step.bin", {"weight": torch.zeros(2), "step": 4})):
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / name} holds no dict of tensors \(a state dict\)$"):
            load_tensor_dict(str(tmp_path / name))
    torch.save({"weight": torch.ones(2)}, tmp_path / "good.bin")
    assert load_tensor_dict(str(tmp_path / "good.bin"))["weight"].tolist() == [1.0, 1.0]


def test_a_state_dict_in_torchs_legacy_format_is_read_whole(tmp_path):
    """PyTorch before 1.6 saved no zip archive, which torch.load cannot memory-map: such a file is
    read whole (with mmap it was 'mmap can only be used with files saved with ...')."""
    from pixelflow_jax.checkpoints.torch_io import load_torch_file

    weights = release_state_dict()
    torch.save(weights, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = load_torch_file(str(tmp_path / "legacy.pt"))
    assert list(loaded) == list(weights) and all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_a_damaged_file_of_the_hub_cache_says_which_file_to_remove(tmp_path, monkeypatch):
    """A rerun reads the cached bytes again: the error must say how to have them downloaded anew."""
    from huggingface_hub import constants

    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import load_torch_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    whole = open(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), "rb").read()
    blob, snapshot = tmp_path / "hub" / "models--me--x" / "blobs" / "0a1b", tmp_path / "hub" / "models--me--x" / "snap"
    blob.parent.mkdir(parents=True)
    snapshot.mkdir()
    blob.write_bytes(whole[:len(whole) // 2])  # a download cut off
    (snapshot / "model.pt").symlink_to(blob)
    with pytest.raises(CheckpointError, match=rf"truncated or not a checkpoint\?\): .*; it is in the Hugging Face "
                                              r"cache, which a rerun reads again: remove "
                                              rf"{blob} to have it downloaded"):
        load_torch_file(str(snapshot / "model.pt"))
    (tmp_path / "model.pt").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or not a checkpoint") as error:
        load_torch_file(str(tmp_path / "model.pt"))
    assert "cache" not in str(error.value)


def test_a_state_dict_nested_or_under_a_name_of_its_own_says_where_the_weights_are():
    """A Lightning-style checkpoint ({'state_dict': ..., 'epoch': ...}, keys under 'model.') was "no
    PixelFlow state dict", or every key listed as missing and as unexpected."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import RELEASE_KEY_ROOTS, extract_state_dict

    weights = release_state_dict()
    assert RELEASE_KEY_ROOTS == {k.split(".")[0] for name in ("c2i_tiny", "t2i_tiny")
                                 for k in release_state_dict(name)}
    lightning = {"callbacks": {}, "epoch": 3, "state_dict": {f"model.{k}": v for k, v in weights.items()}}
    with pytest.raises(CheckpointError, match=r"^w.pt holds no PixelFlow state dict \(.*\); its keys are callbacks, "
                                              r"epoch, state_dict: the weights are likely its 'state_dict': "
                                              r"torch.save\(checkpoint\['state_dict'\], 'weights.pt'\)"):
        extract_state_dict(lightning, "w.pt")
    with pytest.raises(CheckpointError, match=r"^w.pt: every key starts with 'model.', which no PixelFlow weight does "
                                              r".*torch.save\(\{k.removeprefix\('model.'\): v for k, v in"):
        extract_state_dict(lightning["state_dict"], "w.pt")
    with pytest.raises(CheckpointError, match=r"holds no PixelFlow state dict .*; it holds list$"):
        extract_state_dict([1], "w.pt")
    with pytest.raises(CheckpointError, match=r"holds no PixelFlow state dict .*; it holds dict \(empty\)$"):
        extract_state_dict({}, "w.pt")
    blocks = {k: v for k, v in weights.items() if k.startswith("transformer_blocks.")}
    # one root, the model's: its keys are listed later
    assert sorted(extract_state_dict(blocks, "w.pt")) == sorted(blocks)


def test_a_wrappers_prefix_is_removed_only_from_keys_that_all_carry_it_and_as_often_as_it_nests():
    """torch.compile of a DistributedDataParallel model saves '_orig_mod.module.' before every key
    (each removed), an AveragedModel 'module.' and its step count 'n_averaged'; a prefix on some keys only,
    a state dict of several roots or keys without a module are left as they are, for the conversion to
    name what does not fit; keys that are not names are refused (an AttributeError traceback)."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import extract_state_dict

    weights = release_state_dict()
    nested = {f"_orig_mod.module.{k}": v for k, v in weights.items()}
    assert list(extract_state_dict(nested, "w.pt")) == list(weights)
    # torch.optim.swa_utils.AveragedModel, torch's EMA: its step count was refused as an integer tensor
    averaged = torch.optim.swa_utils.AveragedModel(torch.nn.Linear(2, 2)).state_dict()
    averaged = {"n_averaged": averaged["n_averaged"], **{f"module.{k}": v for k, v in weights.items()}}
    assert list(extract_state_dict(averaged, "w.pt")) == list(weights)
    assert list(extract_state_dict({"model": weights, "ema": averaged}, "w.pt")) == list(weights)
    one = torch.zeros(2)
    for kept in ({"module.x": one, "patch_embed.proj.bias": one}, {"encoder.x": one, "decoder.y": one},
                 {"weight": one}, {"n_averaged": one, "module.x": one}):
        assert list(extract_state_dict(kept, "w.pt")) == list(kept)
    with pytest.raises(CheckpointError, match=r"w.pt: n_averaged hold torch.int64 values, not weights"):
        extract_state_dict({"n_averaged": torch.tensor(3), "patch_embed.proj.bias": one}, "w.pt")  # no AveragedModel
    with pytest.raises(CheckpointError, match=r"w.pt holds no PixelFlow state dict"):
        extract_state_dict({0: one}, "w.pt")


def test_a_folder_without_model_pt_names_what_it_holds_instead(tmp_path, converted):
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    folder = tmp_path / "release"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"release is a folder without model.pt; a release folder holds "
                                              r"config.yaml \+ model.pt$"):
        read_release_checkpoint(str(folder))
    (tmp_path / "model.pt").mkdir()  # a folder named like the weights (an unpacked archive?)
    for named in (str(tmp_path / "model.pt"), f"{tmp_path / 'model.pt'}/"):  # a shell completes a folder with '/'
        with pytest.raises(CheckpointError, match=r"model.pt/? is a folder, not a weights file; a release folder "):
            read_release_checkpoint(named)
    (folder / "model.safetensors").write_bytes(b"")  # renamed model.pt, torch would no longer read it as safetensors
    # no config.yaml here: the command it gave named one, and failed with "config file ... does not exist"
    with pytest.raises(CheckpointError, match=rf"model.pt; it holds model.safetensors: convert that file \(convert_"
                                              rf"torch_ckpt.py --torch_checkpoint={folder}/model.safetensors\)$"):
        read_release_checkpoint(str(folder))
    (folder / "model.safetensors").unlink()
    shards = [folder / f"model-0000{n}-of-00002.safetensors" for n in (1, 2)]
    for shard in shards:
        shard.write_bytes(b"")
    # the last shard was offered, as if the newest of train.py's steps: half the weights
    with pytest.raises(CheckpointError, match=r"model.pt; it holds model-00001-of-00002.safetensors, model-00002-of-"
                                              r"00002.safetensors, shards of one state dict, each only part of the "
                                              r"weights: join them into one model.pt in this folder .* and convert "
                                              r"it$"):
        read_release_checkpoint(str(folder))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors is one shard of a state dict, only "
                                              r"part of the weights: join the shards into one model.pt"):
        read_release_checkpoint(str(shards[1]))  # named alone: the others' keys were listed as missing
    for shard in shards:
        shard.unlink()
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"")  # one shard is the whole: offered
    with pytest.raises(CheckpointError, match=r"it holds model-00001-of-00001.safetensors: convert that file"):
        read_release_checkpoint(str(folder))
    (folder / "model-00001-of-00001.safetensors").unlink()
    for name in ("notes.txt", "model_10000.pt", "model_9000.pt"):  # train.py's steps: the newest is offered
        (folder / name).write_bytes(b"")
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "config.yaml"), folder)
    with pytest.raises(CheckpointError, match=rf"model.pt; it holds model_9000.pt, model_10000.pt: convert that file "
                                              rf"\(convert_torch_ckpt.py --torch_checkpoint={folder}/model_10000.pt "
                                              rf"--torch_config={folder}/config.yaml\), or rename it model.pt"):
        read_release_checkpoint(str(folder))
    with pytest.raises(CheckpointError, match=rf"it is a JAX checkpoint .*: export it with --to_torch "
                                              rf"--jax_checkpoint={converted['c2i_tiny']}$"):
        read_release_checkpoint(converted["c2i_tiny"])
    # its config file named instead: "cannot read ... as a PyTorch checkpoint (truncated or not a checkpoint?)"
    with pytest.raises(CheckpointError, match=rf"pixelflow_config.json is not PyTorch weights but a file of the "
                                              rf"folder {converted['c2i_tiny']}; it is a JAX checkpoint .*: export it "
                                              rf"with --to_torch "
                                              rf"--jax_checkpoint={converted['c2i_tiny']}$"):
        read_release_checkpoint(os.path.join(converted["c2i_tiny"], "pixelflow_config.json"))


def test_a_release_folders_config_yaml_named_as_the_weights_says_to_pass_the_folder_or_its_model_pt(tmp_path):
    """Torch read the YAML as a pickle: 'not a file of tensors (Unsupported operand 109)'."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    folder = fixture_dir("c2i_tiny")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{folder}/config.yaml is the release folder's settings file (config.yaml), not its weights: pass the "
            f"folder (--torch_checkpoint={folder}) or its model.pt (--torch_checkpoint={folder}/model.pt)")):
        read_release_checkpoint(os.path.join(folder, "config.yaml"))
    alone = tmp_path / "xl.yml"  # no model.pt beside it
    shutil.copy(os.path.join(folder, "config.yaml"), alone)
    with pytest.raises(CheckpointError, match=re.escape(f"{alone} is a settings file (a release config.yaml), not "
                                                        f"weights: pass the weights file it describes "
                                                        f"(--torch_checkpoint=WEIGHTS.pt --torch_config={alone})")):
        read_release_checkpoint(str(alone))


def test_an_output_on_the_hub_is_refused_by_its_own_name():
    """The refusal named hf://owner/pixelflow_config.json, a path built from the output's parent."""
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", "--output=hf://owner/name")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
        "error: --output: hf://owner/name: hf:// (the Hugging Face Hub) is read here for checkpoints and T5 folders "
        "only"), result.stderr


def test_existing_output_is_refused_and_kept(tmp_path, converted):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={output}")
    assert result.returncode != 0 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (output / "keep.txt").read_text() == "precious"
    result = run_converter("--to_torch", f"--jax_checkpoint={converted['c2i_tiny']}", f"--output={output}")
    assert result.returncode != 0 and (output / "keep.txt").read_text() == "precious"
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={output}", "--overwrite")
    assert result.returncode != 0 and "replaces only an earlier conversion" in result.stderr
    assert os.listdir(output) == ["keep.txt"]  # --overwrite never replaces a folder this tool did not write
    earlier = tmp_path / "earlier"
    shutil.copytree(converted["c2i_tiny"], earlier)
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={earlier}", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(earlier)) == ["params", "pixelflow_config.json"]
    assert [f for f in os.listdir(tmp_path) if f.startswith(".earlier.")] == []
    link = tmp_path / "link"  # e.g. to a larger disk: the folder it names is replaced, the link kept
    os.symlink(earlier, link)
    before = os.stat(earlier / "pixelflow_config.json").st_mtime_ns
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={link}", "--overwrite")
    assert result.returncode == 0 and os.path.islink(link), result.stderr
    assert os.stat(earlier / "pixelflow_config.json").st_mtime_ns != before
    result = run_converter(f"--torch_checkpoint={link}", f"--output={earlier / 'inside'}")
    assert result.returncode != 0 and "overlaps the input" in result.stderr, result.stderr


def test_an_output_of_links_that_lead_to_each_other_is_refused_before_the_conversion(tmp_path):
    """It failed at the last rename, with a traceback, after the whole conversion."""
    import convert_torch_ckpt
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(CheckpointError, match=r"--output .*/a cannot be followed \(Too many levels of symbolic links: "
                                              r"symbolic links that lead to each other\)"):
        convert_torch_ckpt.check_output(str(tmp_path / "a"), fixture_dir("c2i_tiny"), False, False)
    os.symlink(tmp_path / "missing", tmp_path / "to_missing")  # written at the link's target
    convert_torch_ckpt.check_output(str(tmp_path / "to_missing"), fixture_dir("c2i_tiny"), False, False)


def test_an_output_named_like_a_file_is_refused_naming_the_folder_to_give(tmp_path):
    """--output=EXPORT/model.pt made a folder model.pt holding config.yaml + model.pt, which the
    release's code, loading EXPORT/model.pt, met as a folder."""
    import convert_torch_ckpt
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    output = tmp_path / "export" / "model.pt"
    result = run_converter("--to_torch", f"--jax_checkpoint={fixture_dir('c2i_tiny')}", f"--output={output}")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: --output {output} is named like a file (.pt), but the output is a folder holding config.yaml + "
        f"model.pt, as the release's code loads them: name the folder to create, e.g. --output={output.parent} "
        f"(which then holds {output})"), result.stderr
    assert not (tmp_path / "export").exists()
    for name, to_torch, instead in [("config.yaml", True, "--output=DIR (which"),
                                    ("weights.Safetensors", True, "--output=DIR/weights\n"),
                                    ("model.pt", False, "--output=DIR/model\n"),  # a conversion: no model.pt in it
                                    ("xl.json", False, "--output=DIR/xl\n")]:
        with pytest.raises(CheckpointError, match="holding " + ("config.yaml" if to_torch else "pixelflow_config")) as e:
            convert_torch_ckpt.check_output(str(tmp_path / name), fixture_dir("c2i_tiny"), to_torch, False)
        assert instead in str(e.value).replace(str(tmp_path), "DIR") + "\n", e.value
    for name in ("pixelflow_xl.ckpt", "run.pt_export", ".pt"):  # folders' names
        convert_torch_ckpt.check_output(str(tmp_path / name), fixture_dir("c2i_tiny"), True, False)


def test_an_output_that_cannot_be_written_is_told_to_choose_another_output(tmp_path, monkeypatch):
    """The export of a read-only run into a folder it could not write was told that a run in a
    read-only folder "can still be sampled or exported into another", as if it were not that export."""
    import convert_torch_ckpt
    from pixelflow_jax import storage

    def refused(path, data):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(storage.writes, "write_atomically", refused)  # (tests run as root, whom modes do not stop)
    for source, to_torch in ((fixture_dir("c2i_tiny"), False), (str(tmp_path / "run"), True)):
        with pytest.raises(storage.StorageError) as refusal:
            convert_torch_ckpt.check_output(str(tmp_path / "out" / "export"), source, to_torch, False)
        assert re.fullmatch(r"cannot write to .*/out: PermissionError: .*: choose an --output in a folder this user "
                            r"can write to", str(refusal.value)), refusal.value


def test_an_output_that_is_the_folder_the_command_runs_in_is_refused(tmp_path, converted, monkeypatch):
    """`mkdir out && cd out && convert_torch_ckpt.py --output=.` said "wrote ." and renamed its new
    folder over the one the shell stood in: `ls` there showed nothing, the output sat in a folder of
    the same name that the shell was not in (and --overwrite of an earlier output did the same)."""
    import convert_torch_ckpt
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    here = tmp_path / "out"
    here.mkdir()
    monkeypatch.chdir(here)
    for output, overwrite in ((".", False), (str(here), False), ("./", False)):
        with pytest.raises(CheckpointError, match=r"--output .* is the folder this command runs in.*--output=\./"
                                                  r"converted"):
            convert_torch_ckpt.check_output(output, fixture_dir("c2i_tiny"), False, overwrite)
    shutil.copytree(converted["c2i_tiny"], here, dirs_exist_ok=True)  # an earlier conversion, entered
    with pytest.raises(CheckpointError, match="is the folder this command runs in"):
        convert_torch_ckpt.check_output(".", fixture_dir("c2i_tiny"), False, True)
    convert_torch_ckpt.check_output(str(tmp_path / "elsewhere"), fixture_dir("c2i_tiny"), False, False)


def test_an_empty_folder_made_for_the_output_is_taken_in_both_directions(tmp_path, converted):
    """mkdir OUT, then convert into it: "already exists", and with --overwrite "is not an earlier
    conversion": no way in."""
    for name, arguments, written in (
            ("jax", [f"--torch_checkpoint={fixture_dir('c2i_tiny')}"], ["params", "pixelflow_config.json"]),
            ("torch", ["--to_torch", f"--jax_checkpoint={converted['c2i_tiny']}"], ["config.yaml", "model.pt"])):
        (tmp_path / name).mkdir()
        result = run_converter(*arguments, f"--output={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(os.listdir(tmp_path / name)) == written
    assert sorted(os.listdir(tmp_path)) == ["jax", "torch"]


def test_an_output_inside_folders_not_made_yet_is_written_with_them(tmp_path):
    """--output=new/folders/out makes the folders above it (left out, a FileNotFoundError, passed:
    every output tested was in a folder that existed)."""
    from pixelflow_jax.checkpoints.checkpoint import atomic_output_dir

    output = tmp_path / "new" / "folders" / "out"
    with atomic_output_dir(str(output)) as folder:
        with open(os.path.join(folder, "model.pt"), "wb") as f:
            f.write(b"new")
    assert (output / "model.pt").read_bytes() == b"new" and os.listdir(output.parent) == ["out"]


def test_a_failed_conversion_removes_the_folders_it_made_above_its_output(tmp_path):
    """The write check makes them before the conversion: a failure left new/folders/ behind."""
    (tmp_path / "empty.pt").write_bytes(b"")
    for args in ((f"--torch_checkpoint={tmp_path / 'empty.pt'}",), ("--to_torch", f"--jax_checkpoint={tmp_path}")):
        result = run_converter(*args, f"--output={tmp_path / 'new' / 'folders' / 'out'}")
        assert result.returncode == 1 and "error:" in result.stderr, result.stderr
        assert os.listdir(tmp_path) == ["empty.pt"]


def test_load_model_names_a_non_checkpoint_folder(tmp_path):
    from pixelflow_jax import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: expected a training run .* a release folder"):
        load_model(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"unsupported URL scheme s3://; paths are local or gs://"):
        load_model("s3://bucket/run")

    # A folder in or around a checkpoint: the refusal names the path to pass
    run, converted = tmp_path / "run", tmp_path / "converted"
    (run / "checkpoints" / "3" / "state").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    (converted / "params").mkdir(parents=True)
    (converted / "pixelflow_config.json").write_text("{}")
    for given, hint in ((run / "checkpoints", f"it lies inside the checkpoint {run}: pass that"),
                        (run / "checkpoints" / "3" / "state",
                         f"it lies inside the step {run / 'checkpoints' / '3'} of a training run: pass that"),
                        (converted / "params", f"it lies inside the checkpoint {converted}: pass that")):
        with pytest.raises(CheckpointError, match=rf"is not a checkpoint: .*; {re.escape(hint)}$"):
            load_model(str(given))
    os.remove(run / "run_config.json")  # a copy of the run that missed it
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: .*; it holds checkpoints/ but no run_config.json"):
        load_model(str(run))
    with pytest.raises(CheckpointError, match=r"pixelflow_config.json is not a valid pixelflow-jax config: it lacks "
                                              r"'model' \(convert the checkpoint again"):  # was: config: 'model'
        load_model(str(converted))


@pytest.mark.parametrize("kind,name", [("release", "config.yaml"), ("converted", "pixelflow_config.json"),
                                       ("run", "run_config.json")])
def test_a_checkpoints_config_nested_deeper_than_python_reads_is_named_damaged_not_a_traceback(tmp_path, kind, name):
    """A crafted config of 100,000 nested lists came out of load_model as a RecursionError traceback
    (a security review's file): each reader names the file and its nesting instead."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    folder = {"release": tmp_path, "converted": tmp_path / "params", "run": tmp_path / "checkpoints" / "3" / "state"}
    folder[kind].mkdir(parents=True, exist_ok=True)
    if kind == "release":
        shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), tmp_path)
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / name).write_text(f"model: {deep}" if name.endswith(".yaml") else deep)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / name))} .*nested more than \d+ levels deep"):
        load_model(str(tmp_path))
    if kind == "release":  # a model.pt named alone: its config.yaml is asked whether it is the release's
        from pixelflow_jax.checkpoints.torch_io import is_release_yaml

        assert not is_release_yaml(str(tmp_path / name))


def test_a_converted_folder_without_its_params_folder_is_named_an_unfinished_conversion(tmp_path, converted):
    """Its pixelflow_config.json alone (params/ deleted, or not yet copied): orbax's failure to
    restore blamed damage or another architecture."""
    from pixelflow_jax import CheckpointError

    folder = tmp_path / "no_params"
    shutil.copytree(converted["c2i_tiny"], folder)
    shutil.rmtree(folder / "params")
    with pytest.raises(CheckpointError, match=rf"^{folder} has no params/ folder; the conversion did not finish, "
                                              "convert again$"):
        load_model(str(folder))


def test_a_converted_folder_named_by_a_relative_path_loads(tmp_path, converted, monkeypatch):
    """orbax restores from an absolute path only ('Checkpoint path should be absolute'): its params/
    given relative passed, every converted folder loaded was named by its absolute path."""
    shutil.copytree(converted["c2i_tiny"], tmp_path / "converted")
    monkeypatch.chdir(tmp_path)
    model, config = load_model("converted")
    assert config.resolution == 64 and model.config == config.model


def test_a_converted_config_missing_architecture_fields_names_them_not_xls_defaults(tmp_path, converted):
    """A pixelflow_config.json whose model lost fields (an edit) was read with XL's defaults in their
    place, and the weights refused as 'not the architecture {... 'depth': 28 ...}'."""
    from pixelflow_jax import CheckpointError

    edited = tmp_path / "edited"
    shutil.copytree(converted["c2i_tiny"], edited)
    with json_edited(edited / "pixelflow_config.json") as values:
        del values["model"]["depth"], values["model"]["patch_size"]
    with pytest.raises(CheckpointError, match=r"pixelflow_config.json is not a valid pixelflow-jax config: it lacks "
                                              r"'model.depth', 'model.patch_size' \(convert the checkpoint again"):
        load_model(str(edited))


def test_pooled_text_is_this_projects_addition_named_only_when_on_and_never_exported():
    from pixelflow_jax.checkpoints.convert import ConversionError, params_to_torch
    from pixelflow_jax.config import ModelConfig

    release = ModelConfig(num_classes=0, cross_attention_dim=20)
    assert "pooled_text" not in release.architecture()  # the release's architectures read as before
    pooled = ModelConfig(num_classes=0, cross_attention_dim=20, pooled_text=True)
    assert pooled.architecture()["pooled_text"] is True
    assert ModelConfig.from_mapping(pooled.architecture()) == pooled  # as run_config.json records it
    with pytest.raises(ConversionError, match=r"model.pooled_text=True.*the release cannot load"):
        params_to_torch({}, pooled)
    with pytest.raises(ValueError, match=r"needs a text model \(model.cross_attention_dim > 0\)"):
        ModelConfig(pooled_text=True)


def test_a_flag_of_the_other_direction_is_refused_not_ignored(tmp_path, converted):
    """--to_torch with --resolution=128 exited 0 and wrote the checkpoint's 64."""
    result = run_converter("--to_torch", f"--jax_checkpoint={converted['c2i_tiny']}", "--resolution=128",
                           f"--output={tmp_path / 'out'}")
    assert result.returncode != 0 and "--resolution has no effect here: --to_torch exports" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert len(result.stderr.splitlines()) == 2, result.stderr  # the error and where help is, not the whole help


def test_an_export_without_to_torch_is_told_to_add_it(tmp_path, converted):
    """--jax_checkpoint alone was answered 'give either --torch_checkpoint ... or --to_torch --jax_checkpoint'."""
    result = run_converter(f"--jax_checkpoint={converted['c2i_tiny']}", f"--output={tmp_path / 'out'}")
    assert result.returncode != 0 and result.stderr.startswith(
        "error: --jax_checkpoint is read by an export to PyTorch: add --to_torch\n"), result.stderr
    assert not (tmp_path / "out").exists()
    # beside --torch_checkpoint it is a flag of the other direction: adding --to_torch would not help
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--jax_checkpoint={converted['c2i_tiny']}",
                           f"--output={tmp_path / 'out'}")
    assert result.returncode != 0 and result.stderr.startswith(
        "error: --jax_checkpoint has no effect here: --torch_checkpoint converts PyTorch to JAX\n"), result.stderr
    assert not (tmp_path / "out").exists()


def test_a_converted_folder_of_a_newer_format_asks_for_an_upgrade(converted, tmp_path):
    from pixelflow_jax import CheckpointError

    folder = tmp_path / "newer"
    shutil.copytree(converted["c2i_tiny"], folder)
    with json_edited(folder / "pixelflow_config.json") as config:
        config["format_version"] = 2
    with pytest.raises(CheckpointError, match="format_version 2 is from a newer pixelflow-jax .*upgrade"):
        load_model(str(folder))


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_conversion_stopped_by_a_signal_removes_its_partial_output_and_says_so(tmp_path, converted, stop):
    """A SIGTERM left the hidden temporary folder (gigabytes on XL) and printed nothing; Ctrl-C
    printed a KeyboardInterrupt traceback. The signal here comes the moment model.pt is written,
    before the folder is renamed into place."""
    output = tmp_path / "export"
    script = f"""
import os, runpy, signal, sys
import torch
write = torch.save
def write_then_signal(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.{stop})
torch.save = write_then_signal
sys.argv = ["convert_torch_ckpt.py", "--to_torch", "--jax_checkpoint={converted['c2i_tiny']}", "--output={output}"]
runpy.run_path("convert_torch_ckpt.py", run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    cause, status = {"SIGTERM": ("terminated (SIGTERM)", 143), "SIGINT": ("interrupted (Ctrl-C)", 130),
                     "SIGUSR1": ("terminated (SIGUSR1, handled as SIGTERM)", 138)}[stop]  # SLURM's --signal=USR1
    assert result.returncode == status, result.stderr
    assert f"stopped: {cause}; nothing was written to {output} (its partial copy is removed)" in result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize("delay_s", [1.0, 1.5])
def test_ctrl_c_while_the_converter_starts_stops_it_in_one_line_and_writes_nothing(tmp_path, delay_s):
    """While jax imports, Python dropped the KeyboardInterrupt inside jax's gc callback: the
    conversion ran to the end with exit status 0, or a 50-line import traceback was printed."""
    import signal
    import time

    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "convert_torch_ckpt.py",
                                f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={output}"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay_s)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("stopped: interrupted (Ctrl-C); nothing was written")
    assert not output.exists() and os.listdir(tmp_path) == []


def test_a_release_config_yaml_that_is_cut_short_or_holds_other_values_is_named(tmp_path, caplog):
    """A config.yaml without data: silently 256 px; runtime keys (param_dtype, attention) were baked
    into the converted folder; 2.0 heads a traceback, 64.9 px silently 64."""
    import logging

    import torch

    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.convert import params_to_torch, torch_to_params
    from pixelflow_jax.checkpoints.torch_io import float32_numpy, read_release_checkpoint

    release = yaml.safe_load(open(os.path.join(fixture_dir("c2i_tiny"), "config.yaml")))

    def folder_with(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), folder / "model.pt")
        values = yaml.safe_load(yaml.safe_dump(release))
        edit(values)
        (folder / "config.yaml").write_text(yaml.safe_dump(values))
        return str(folder)

    cut_short = folder_with("cut_short", lambda v: (v.pop("data"), v.pop("scheduler")))
    with caplog.at_level(logging.WARNING):
        config, _ = read_release_checkpoint(cut_short)
    assert config.resolution == 256 and config.num_stages == 4
    assert ("config.yaml gives no data.resolution, so 256 px is assumed (the release's); pass "
            "--resolution") in caplog.text
    assert ("config.yaml gives no scheduler.num_stages / num_train_timesteps: num_stages 4, num_train_timesteps "
            "1000 assumed (the release's); pass --num_stages / --num_train_timesteps to set them") in caplog.text
    for name, edit, message in (
            ("runtime", lambda v: v["model"]["params"].update(param_dtype="float16", attention="splash"),
             "model.params attention, param_dtype are not an argument of the release's PixelFlowModel"),
            ("float_heads", lambda v: v["model"]["params"].update(num_attention_heads=2.0),
             "model.params.num_attention_heads must be a whole number, got 2.0"),
            ("quoted_bias", lambda v: v["model"]["params"].update(attention_bias="false"),
             "model.params.attention_bias must be true or false, got 'false'"),
            ("fraction", lambda v: v["data"].update(resolution=64.9),
             "data.resolution must be a whole number, got 64.9")):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            read_release_checkpoint(folder_with(name, edit))

    with pytest.raises(CheckpointError, match=r"tensor x holds no readable values \(meta torch.float32\)"):
        float32_numpy({"x": torch.empty(2, device="meta")})
    config, state_dict = read_release_checkpoint(fixture_dir("c2i_tiny"))
    bf16 = jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16), torch_to_params(state_dict, config.model))
    assert {a.dtype for a in params_to_torch(bf16, config.model).values()} == {np.dtype(np.float32)}  # the release's


def test_a_release_config_yaml_of_another_model_or_with_dropout_is_refused_and_its_defaults_read(tmp_path):
    """model.params as the release reads them: dropout 0 (as released) read and dropped, another
    value refused; another target refused; cross_attention_dim null read as no text; true for a
    number refused (bool is an int in Python); no target is the release's model."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import config_from_release_yaml

    release = yaml.safe_load(open(os.path.join(fixture_dir("c2i_tiny"), "config.yaml")))

    def read(edit):
        values = yaml.safe_load(yaml.safe_dump(release))
        edit(values)
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
        return config_from_release_yaml(str(tmp_path / "config.yaml"))[0]

    assert read(lambda v: v["model"]["params"].update(dropout=0.0, cross_attention_dim=None)) == {
        **release["model"]["params"], "cross_attention_dim": None}
    assert read(lambda v: v["model"].pop("target")) == release["model"]["params"]  # the release's model is meant
    for edit, message in ((lambda v: v["model"]["params"].update(dropout=0.1), "sets model dropout"),
                          (lambda v: v["model"].update(target="pixelflow.model.Other"),
                           "describes pixelflow.model.Other, not pixelflow.model.PixelFlowModel"),
                          (lambda v: v["model"]["params"].update(depth=True),
                           "model.params.depth must be a whole number, got True")):
        with pytest.raises(CheckpointError, match=message):
            read(edit)


def test_a_release_folders_model_pt_named_alone_is_not_written_beside(tmp_path):
    release = tmp_path / "release"
    shutil.copytree(fixture_dir("c2i_tiny"), release)
    result = run_converter(f"--torch_checkpoint={release / 'model.pt'}", f"--output={release / 'converted'}")
    assert_failed_cleanly(result, str(release / "converted"), "it is inside the input")
    assert sorted(os.listdir(release)) == sorted(os.listdir(fixture_dir("c2i_tiny")))


@pytest.mark.parametrize("name", ["c2i_tiny", "t2i_tiny"])
def test_an_exported_config_yaml_holds_the_releases_model_scheduler_and_resolution(name):
    """What the release's sample_ddp.py builds its model and scheduler from: every scheduler value
    (pyramid_shift too, which would change the release's sampling silently) as the release wrote it."""
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint, release_yaml

    release = yaml.safe_load(open(os.path.join(fixture_dir(name), "config.yaml")))
    config = read_release_checkpoint(fixture_dir(name))[0]
    exported = release_yaml(config)
    assert exported["model"] == release["model"] and exported["scheduler"] == release["scheduler"]
    assert exported["data"] == {"resolution": release["data"]["resolution"]} and "train" not in exported
    if config.model.cross_attention_dim:  # how a text run encoded its captions, which sampling repeats
        recorded = dataclasses.replace(config, max_text_tokens=128, text_encoder_dtype="bfloat16")
        assert release_yaml(recorded)["train"] == {"max_text_tokens": 128, "text_encoder_dtype": "bfloat16"}


def test_the_export_of_a_text_run_names_the_t5_it_leaves_out(tmp_path):
    """The export of a text run said only what it wrote: a run that built its own T5 (random frozen
    weights, as the captioned demo does) keeps it inside the run, and its export samples with that
    encoder alone, so a user who kept the export and deleted the run had weights no prompt could drive."""
    import json

    import convert_torch_ckpt
    from pixelflow_jax.api import CheckpointSource
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep
    from pixelflow_jax.config import ModelConfig

    text, classes = ModelConfig(num_classes=0, cross_attention_dim=20), ModelConfig(num_classes=10)
    run = tmp_path / "run"
    run.mkdir()
    of_run = CheckpointSource(str(run / "checkpoints" / "20"), str(run / "checkpoints" / "20"), RunStep(str(run), 20))
    for recorded, named in (("text_encoder", f"{run}/text_encoder, the one the run trained with (inside the run: keep "
                                             "that folder, or copy it beside the export)"),
                            ("hf://google/flan-t5-xl", "hf://google/flan-t5-xl, the one the run trained with"),
                            # a folder beside the run whose name starts with the run's is not inside it
                            (f"{run}_t5", f"{run}_t5, the one the run trained with")):
        (run / "run_config.json").write_text(json.dumps({"text_encoder": {"path": recorded, "max_text_tokens": 8}}))
        assert convert_torch_ckpt.text_encoder_note(of_run, text) == (
            f"; the export holds no T5 text encoder: sample it with --config.sample.text_encoder={named}")
    assert convert_torch_ckpt.text_encoder_note(of_run, classes) == ""
    converted = CheckpointSource(str(tmp_path / "converted"), str(tmp_path / "converted"))
    assert convert_torch_ckpt.text_encoder_note(converted, text).startswith("; the export holds no T5 text encoder: "
                                                                            "sample it with the one it was trained")


def test_a_release_folders_recorded_text_token_length_is_sampled_with_and_a_bad_one_named(encoder_folder, tmp_path,
                                                                                       caplog):
    """train.max_text_tokens in a release folder's config.yaml (what an export of a text run writes)
    is the length its prompts are cut at, unless asked otherwise (with a warning); the fixture's
    train section has none (the release's 512); a value training could not have had is named."""
    import logging

    from pixelflow_jax.api import sampling_source
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    folder = tmp_path / "release"
    shutil.copytree(fixture_dir("t2i_tiny"), folder)
    release = yaml.safe_load((folder / "config.yaml").read_text())
    job = str(tmp_path / "job")

    def sampled_tokens(recorded, asked=0):
        (folder / "config.yaml").write_text(yaml.safe_dump({**release, "train": {**release["train"], **recorded}}))
        config = t2i_config(**{"sample.checkpoint": str(folder), "sample.text_encoder": encoder_folder,
                               "sample.max_text_tokens": asked})
        sampling_source(config, job)
        return config.sample.max_text_tokens

    assert sampled_tokens({}) == 512
    with caplog.at_level(logging.WARNING):
        assert sampled_tokens({"max_text_tokens": 6}) == 6 and "text tokens" not in caplog.text
        assert sampled_tokens({"max_text_tokens": 6}, asked=16) == 16
    assert f"sampling {folder} with 16 text tokens; it trained with 6 tokens" in caplog.text
    for bad in ("six", 1, 5000, True, 6.0):
        with pytest.raises(CheckpointError, match=rf"config.yaml: train.max_text_tokens must be a whole number from 2 "
                                                  rf"to 4096 \(the prompt length the model trained with\), got "
                                                  rf"{re.escape(repr(bad))}: mend it, or remove it"):
            sampled_tokens({"max_text_tokens": bad})


def test_a_release_folders_recorded_text_encoder_dtype_is_sampled_with_and_a_bad_one_named(encoder_folder, tmp_path):
    """train.text_encoder_dtype in an export's config.yaml: the T5 weights' dtype whose embeddings
    the run trained on (bfloat16 ones differ from float32 ones), used unless another is asked for."""
    from pixelflow_jax.api import sampling_source
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    folder = tmp_path / "release"
    shutil.copytree(fixture_dir("t2i_tiny"), folder)
    release = yaml.safe_load((folder / "config.yaml").read_text())

    def sampled_dtype(recorded, asked=""):
        (folder / "config.yaml").write_text(yaml.safe_dump({**release, "train": {**release["train"], **recorded}}))
        config = t2i_config(**{"sample.checkpoint": str(folder), "sample.text_encoder": encoder_folder,
                               "sample.text_encoder_param_dtype": asked})
        sampling_source(config, str(tmp_path / "job"))
        return config.sample.text_encoder_param_dtype

    assert sampled_dtype({}) == "float32"
    assert sampled_dtype({"text_encoder_dtype": "bfloat16"}) == "bfloat16"
    assert sampled_dtype({"text_encoder_dtype": "bfloat16"}, asked="float32") == "float32"
    for bad in ("bf16", 16):
        with pytest.raises(CheckpointError, match=rf"config.yaml: train.text_encoder_dtype must be 'float32' or "
                                                  rf"'bfloat16' \(the T5 weights' dtype the model trained with\), got "
                                                  rf"{re.escape(repr(bad))}: mend it, or remove it"):
            sampled_dtype({"text_encoder_dtype": bad})


@pytest.mark.slow  # three conversions: ~45 s on 2 cores
def test_the_export_of_a_text_run_samples_at_the_token_length_and_encoder_dtype_it_trained_with(
        converted, encoder_folder, tmp_path, caplog):
    """A text run trained with train.max_text_tokens=6 was exported without that length, so its
    export sampled (and inspected) at the release's 512: prompts that training cut at 6 tokens
    reached the model whole. The export's config.yaml records it (a key the release ignores), and
    the export, its conversion back to JAX and that one's export sample with it; so too the dtype of
    the T5 weights it trained with (bfloat16 here, which they sampled as float32)."""
    import logging

    from pixelflow_jax.api import sampling_source
    from pixelflow_jax.inspect_model import text_length
    from pixelflow_jax.training import checkpointing
    from pixelflow_jax.training.run_config import check_run_config
    from pixelflow_jax.training.train_step import StepConfig, init_state, make_optimizer

    run, export = str(tmp_path / "run"), tmp_path / "export"
    model, ckpt = load_model(converted["t2i_tiny"])
    check_run_config(run, ckpt.model, t2i_config(), text_encoder={"path": encoder_folder, "max_text_tokens": 6})
    (tmp_path / "run" / "train_settings.json").write_text('{"train.text_encoder_dtype": "bfloat16"}')
    manager = checkpointing.checkpoint_manager(run, keep=2)
    checkpointing.save(manager, 2, init_state(model, make_optimizer(StepConfig()), seed=0))
    manager.wait_until_finished()
    manager.close()
    result = run_converter("--to_torch", f"--jax_checkpoint={run}", f"--output={export}")
    assert result.returncode == 0, result.stderr
    assert "prompts cut at 6 tokens" in result.stdout, result.stdout
    assert yaml.safe_load((export / "config.yaml").read_text())["train"] == {"max_text_tokens": 6,
                                                                            "text_encoder_dtype": "bfloat16"}

    for asked, used, warned in ((0, 6, False), (6, 6, False), (16, 16, True)):
        config = t2i_config(**{"sample.checkpoint": str(export), "sample.text_encoder": encoder_folder,
                               "sample.max_text_tokens": asked})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            source, _ = sampling_source(config, str(tmp_path / "job"))
        assert config.sample.max_text_tokens == used
        assert ("with 16 text tokens; it trained with 6 tokens" in caplog.text) == warned, caplog.text
    assert text_length(c2i_config(), source) == 6  # a class config's inspect of the export

    back, again = tmp_path / "back", tmp_path / "again"  # its conversion to JAX, and that exported anew
    assert run_converter(f"--torch_checkpoint={export}", f"--output={back}").returncode == 0
    assert run_converter("--to_torch", f"--jax_checkpoint={back}", f"--output={again}").returncode == 0
    for folder in back, again:
        config = t2i_config(**{"sample.checkpoint": str(folder), "sample.text_encoder": encoder_folder})
        sampling_source(config, str(tmp_path / "job"))
        assert (config.sample.max_text_tokens, config.sample.text_encoder_param_dtype) == (6, "bfloat16"), folder
    assert load_model(run)[1].max_text_tokens == 6 and load_model(converted["t2i_tiny"])[1].max_text_tokens is None


@pytest.mark.slow  # four conversions: ~50 s on 2 cores
def test_a_training_runs_export_converted_back_holds_the_runs_weights_bit_for_bit(converted, tmp_path):
    """The round trip a user checks an export with: a run's step exported for PyTorch (the EMA of a
    named step; the raw weights of the latest), then converted back to JAX, has every parameter of
    those weights with the same bits, dtype and shape, and the run's architecture and schedule."""
    from test_run_checkpoint import pure_params, write_run

    workdir = str(tmp_path / "run")
    weights = write_run(converted["c2i_tiny"], workdir)
    for source, chosen, expected in ((f"{workdir}/checkpoints/2", "ema", weights[2]["ema"]),
                                     (workdir, "model", weights[4]["params"])):
        export, back = tmp_path / f"export_{chosen}", tmp_path / f"back_{chosen}"
        result = run_converter("--to_torch", f"--jax_checkpoint={source}", f"--weights={chosen}", f"--output={export}")
        assert result.returncode == 0, result.stderr
        which = "the EMA (--weights=ema)" if chosen == "ema" else "the raw weights, not their EMA (--weights=model),"
        step = 2 if chosen == "ema" else 4  # (the folder handed on said neither which weights nor which step)
        assert (export / "config.yaml").read_text().splitlines()[:2] == [
            "# written by pixelflow-jax: convert_torch_ckpt.py --to_torch",
            f"# weights: {which} of step {step} of the training run in the folder run"]
        result = run_converter(f"--torch_checkpoint={export}", f"--output={back}")
        assert result.returncode == 0, result.stderr
        model, config = load_model(str(back))
        assert config == load_model(workdir)[1]
        got = dict(jax.tree_util.tree_leaves_with_path(pure_params(model)))
        want = dict(jax.tree_util.tree_leaves_with_path(expected))
        assert got.keys() == want.keys()
        for path, value in want.items():
            assert got[path].dtype == value.dtype and got[path].shape == value.shape, path
            assert np.array_equal(got[path].view(np.uint32), value.view(np.uint32)), path  # the bits: -0.0 too


def test_the_converter_never_replaces_its_input_or_a_foreign_folder(tmp_path, converted):
    release = tmp_path / "release"
    shutil.copytree(fixture_dir("c2i_tiny"), release)
    result = run_converter(f"--torch_checkpoint={release}", f"--output={release}", "--overwrite")
    assert result.returncode != 0 and "overlaps the input" in result.stderr
    assert sorted(os.listdir(release)) == ["config.yaml", "golden.npz", "golden_train_step.npz", "model.pt"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"cat")
    result = run_converter("--to_torch", f"--jax_checkpoint={converted['c2i_tiny']}", f"--output={foreign}",
                           "--overwrite")
    assert result.returncode != 0 and "replaces only an earlier export" in result.stderr
    assert os.listdir(foreign) == ["cat.jpg"]

    # A release folder the user downloaded looks like an export (config.yaml + model.pt), and a
    # conversion may hold the user's notes: neither is replaced.
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name in ("config.yaml", "model.pt"):
        shutil.copy(release / name, downloaded / name)
    with_notes = tmp_path / "with_notes"
    shutil.copytree(converted["c2i_tiny"], with_notes)
    (with_notes / "notes.txt").write_text("mine")
    for args, output in ((("--to_torch", f"--jax_checkpoint={converted['t2i_tiny']}"), downloaded),
                         ((f"--torch_checkpoint={release}",), with_notes)):
        before = {name: (output / name).stat().st_mtime_ns for name in os.listdir(output)}
        result = run_converter(*args, f"--output={output}", "--overwrite")
        assert result.returncode != 0 and "holding nothing else" in result.stderr, result.stderr
        assert {name: (output / name).stat().st_mtime_ns for name in os.listdir(output)} == before
    export = tmp_path / "export"
    for _ in range(2):  # an export of this tool is marked as one, so --overwrite may replace it
        result = run_converter("--to_torch", f"--jax_checkpoint={converted['c2i_tiny']}", f"--output={export}",
                               "--overwrite")
        assert result.returncode == 0, result.stderr


def test_an_export_into_a_bucket_reads_back_from_there_as_the_release_folder_it_was_given(bucket):
    """torch.save writes local files only: an export into gs:// saves model.pt here and uploads it
    (untested, torch.save given the gs:// path passed the suite)."""
    from pixelflow_jax.checkpoints.torch_io import is_export, read_release_checkpoint, write_release_checkpoint

    config, state_dict = read_release_checkpoint(fixture_dir("c2i_tiny"))
    export = f"{bucket}/export"
    write_release_checkpoint(export, state_dict, config)
    assert is_export(export)
    read_back, weights = read_release_checkpoint(export)
    assert read_back == config and list(weights) == list(state_dict)
    assert all(np.array_equal(weights[key], value) for key, value in state_dict.items())


def test_a_converted_folder_is_marked_complete_by_its_config_written_after_its_params(tmp_path, monkeypatch):
    """In a bucket a converted folder is written in place: a conversion killed after writing
    pixelflow_config.json but before its params would leave a folder that reads as a checkpoint."""
    import orbax.checkpoint as ocp

    from pixelflow_jax.checkpoints.checkpoint import CONFIG_FILE, CheckpointConfig, read_config, save_checkpoint

    output, marked_before_params = tmp_path / "out", []
    real_save = ocp.StandardCheckpointer.save

    def save_params(self, directory, *args, **kwargs):
        marked_before_params.append(os.path.exists(os.path.join(os.path.dirname(str(directory)), CONFIG_FILE)))
        return real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_params)
    config = CheckpointConfig(model=ModelConfig.from_mapping(c2i_config().model))
    save_checkpoint(str(output), {"w": np.zeros(2, np.float32)}, config)
    assert marked_before_params == [False] and read_config(str(output)) == config


def test_a_torch_config_beside_an_exports_config_yaml_keeps_the_text_training_it_records(tmp_path):
    """A text run's export records train.max_text_tokens and text_encoder_dtype in its config.yaml;
    --torch_config with the same architecture but without them (the release's file) dropped both,
    so the conversion sampled at 512 tokens with float32 T5 weights. A value the two give differently
    is named, not chosen."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    export = tmp_path / "export"
    shutil.copytree(fixture_dir("t2i_tiny"), export)
    values = yaml.safe_load((export / "config.yaml").read_text())
    values["train"] = {"max_text_tokens": 16, "text_encoder_dtype": "bfloat16"}
    (export / "config.yaml").write_text(yaml.safe_dump(values))
    release_file = os.path.join(fixture_dir("t2i_tiny"), "config.yaml")  # no train.max_text_tokens
    recorded = {"max_text_tokens": 16, "text_encoder_dtype": "bfloat16"}
    for weights in (export, export / "model.pt"):
        config, _ = read_release_checkpoint(str(weights), torch_config=release_file)
        assert config.text_training() == recorded, weights
    values["train"] = {"max_text_tokens": 32}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(values))
    for weights in (export, export / "model.pt"):
        with pytest.raises(CheckpointError, match=re.escape(
                f"--torch_config {tmp_path / 'other.yaml'} gives train.max_text_tokens 32 where "
                f"{export / 'config.yaml'}, which describes the weights, records 16")):
            read_release_checkpoint(str(weights), torch_config=str(tmp_path / "other.yaml"))


def test_a_config_yaml_that_holds_no_settings_or_a_section_of_another_shape_says_what_it_holds(tmp_path):
    """An empty config.yaml was 'not a release config.yaml (needs model.params): 'NoneType' object is
    not subscriptable'; `data: resolution` (a section written as a word) a TypeError traceback; a
    list for `scheduler` a warning that it gives no stages, 4 assumed."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    release = open(os.path.join(fixture_dir("c2i_tiny"), "config.yaml")).read()
    section = lambda name, value: re.sub(rf"{name}:\n(  .*\n)+", f"{name}: {value}\n", release)
    for name, text, message in (
            ("empty", "", "is empty, not a release config.yaml"),
            ("null", "null\n", "is empty, not a release config.yaml"),
            ("list", "- model\n", "holds a list, not a release config.yaml"),
            ("word", "model\n", "holds the text 'model', not a release config.yaml"),
            ("no_model", "data: {resolution: 64}\n", "has no model.params (the release's PixelFlowModel arguments)"),
            ("params_null", "model: {params: null}\n", "has no model.params"),
            ("params_list", "model: {params: [2, 16]}\n", "model.params must be a mapping (params: followed by "
                                                          "indented `name: value` lines), got [2, 16]"),
            ("data_word", section("data", "resolution"), "data must be a mapping (data: followed by indented "
                                                         "`name: value` lines), got 'resolution'"),
            ("scheduler_list", section("scheduler", "[4]"), "scheduler must be a mapping"),
            ("train_word", section("train", "max_text_tokens"), "train must be a mapping")):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), folder / "model.pt")
        (folder / "config.yaml").write_text(text)
        with pytest.raises(CheckpointError, match=re.escape(str(folder / "config.yaml")) + ".*" + re.escape(message)):
            read_release_checkpoint(str(folder))
    # `data:` with nothing under it is a section left empty: no resolution given, as without one
    weights = os.path.join(fixture_dir("c2i_tiny"), "model.pt")
    config, _ = read_release_checkpoint(weights, torch_config=str(_written(tmp_path, section("data", ""))))
    assert config.resolution == 256


def _written(tmp_path, text):
    path = tmp_path / "written.yaml"
    path.write_text(text)
    return path


def test_a_folder_named_config_yaml_beside_model_pt_is_named_as_a_folder(tmp_path):
    """A folder named config.yaml was read as no config.yaml: the converter asked for
    --torch_config=config.yaml (or --attention_head_dim), sampling said the folder lacks one."""
    from pixelflow_jax.api import checkpoint_config, resolve_checkpoint
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), folder / "model.pt")
    (folder / "config.yaml").mkdir()
    named = re.escape(f"{folder / 'config.yaml'} is a folder, where a release folder's config.yaml is the YAML file "
                      "of its settings")
    for read in (lambda: read_release_checkpoint(str(folder)),
                 lambda: read_release_checkpoint(str(folder / "model.pt")),
                 lambda: checkpoint_config(resolve_checkpoint(str(folder))),
                 lambda: resolve_checkpoint(str(folder / "model.pt"))):
        with pytest.raises(CheckpointError, match=named):
            read()


def test_a_converted_folders_config_of_another_shape_or_with_numbers_that_are_not_whole_is_named(tmp_path):
    """pixelflow_config.json holding a list, null or a word was an AttributeError traceback; a
    resolution of 64.5 or "64" was read as 64, and a format_version "1" called newer than 1."""
    import json

    from pixelflow_jax.checkpoints.checkpoint import CheckpointError, read_config
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    good = read_release_checkpoint(fixture_dir("c2i_tiny"))[0].to_json()
    for name, values, message in (
            ("list", [], "it holds a list, not the mapping of settings that convert_torch_ckpt.py writes"),
            ("null", None, "it holds null, not the mapping"),
            ("word", "x", "it holds the text 'x', not the mapping"),
            ("half", {**good, "resolution": 64.5}, "resolution must be a whole number, got 64.5"),
            ("quoted", {**good, "resolution": "64"}, "resolution must be a whole number, got '64'"),
            ("flag", {**good, "resolution": True}, "resolution must be a whole number, got True"),
            ("stages", {**good, "scheduler": {**good["scheduler"], "num_stages": "4"}},
             "scheduler.num_stages must be a whole number, got '4'"),
            ("scheduler_list", {**good, "scheduler": [4]}, "scheduler must be a mapping, got [4]"),
            ("model_list", {**good, "model": [2]}, "model must be a mapping, got [2]"),
            ("version", {**good, "format_version": "1"}, "format_version must be a whole number, got '1'")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "pixelflow_config.json").write_text(json.dumps(values))
        with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'pixelflow_config.json'} is not a valid "
                                                            f"pixelflow-jax config: {message}")):
            read_config(str(folder))


def test_a_platform_jax_cannot_start_stops_the_converter_in_one_line_before_it_reads(tmp_path, monkeypatch):
    """JAX_PLATFORMS=cuda on a machine without NVIDIA GPUs: jax's traceback once the conversion saved."""
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    output = str(tmp_path / "converted")
    result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={output}")
    assert_failed_cleanly(result, output, "error: JAX_PLATFORMS=cuda asks jax for a platform it cannot start here")


def test_a_class_checkpoints_config_names_only_fields_a_version_of_2026_11_26_reads():
    """Every conversion wrote model.pooled_text, false for every release architecture, and versions
    of 2026-11-26 refuse a config with a key they do not know ('unknown model config keys
    ['pooled_text']'): no checkpoint converted here could be sampled there. Named only when on, as
    run_config.json's architecture names it; a pooled model is still refused there, as it must be."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointConfig
    from pixelflow_jax.config import ModelConfig

    known_on_2026_11_26 = {"num_attention_heads", "attention_head_dim", "depth", "patch_size", "in_channels",
                           "out_channels", "num_classes", "attention_bias", "cross_attention_dim", "dtype",
                           "param_dtype", "attention", "remat"}
    shape = dict(num_attention_heads=2, attention_head_dim=16, depth=2, patch_size=4)
    for model in (ModelConfig(**shape, num_classes=10), ModelConfig(**shape, num_classes=0, cross_attention_dim=8)):
        written = CheckpointConfig(model=model, num_train_timesteps=1000, num_stages=4, resolution=64).to_json()
        assert set(written["model"]) == known_on_2026_11_26
        assert CheckpointConfig.from_json(written).model == model
    pooled = ModelConfig(**shape, num_classes=0, cross_attention_dim=8, pooled_text=True)
    written = CheckpointConfig(model=pooled, num_train_timesteps=1000, num_stages=4, resolution=64).to_json()
    assert written["model"]["pooled_text"] is True and CheckpointConfig.from_json(written).model == pooled


def test_the_same_weights_converted_again_here_or_elsewhere_keep_their_fingerprint(tmp_path, converted):
    """orbax names its data files afresh at each save: the fingerprint of a converted folder's files
    changed at every conversion, and a sampling job was refused as of 'other weights' after the same
    release weights were converted again into its checkpoint's folder."""
    from pixelflow_jax.api import resolve_checkpoint

    fingerprint = lambda folder: resolve_checkpoint(str(folder)).fingerprint()
    again = tmp_path / "again"
    for overwrite in ((), ("--overwrite",)):
        result = run_converter(f"--torch_checkpoint={fixture_dir('c2i_tiny')}", f"--output={again}", *overwrite)
        assert result.returncode == 0, result.stderr
        assert fingerprint(again) == fingerprint(converted["c2i_tiny"])
    assert fingerprint(again) != fingerprint(converted["t2i_tiny"])


def test_the_weights_digest_follows_each_parameters_name_dtype_shape_and_bytes_alone():
    """The digest a conversion records identifies the weights on any host and jax version: pinned,
    so that a change to how it is computed (which would make every recorded sampling job's checkpoint
    read as other weights) fails here."""
    import ml_dtypes

    from pixelflow_jax.checkpoints.checkpoint import weights_digest

    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    scale = np.array([0.5, -2.0], dtype=ml_dtypes.bfloat16)
    params = {"block": {"kernel": kernel, "scale": scale}}
    digest = weights_digest(params)
    assert digest == "34adfff9cb0b0dbd8c94c4fc8fe78c6bf3271b286e39acb94247166f9fc33108"
    # Another order of the names, another byte order, arrays on a device: the same weights.
    assert weights_digest({"block": {"scale": jnp.asarray(scale), "kernel": kernel.astype(">f4")}}) == digest
    nudged = kernel.copy()
    nudged[1, 2] = np.nextafter(nudged[1, 2], np.float32(np.inf))
    others = [{"block": {"kernel": nudged, "scale": scale}},  # one value by one ulp
              {"block": {"kernel": kernel, "scale": scale.astype(np.float32)}},  # a dtype, same values
              {"block": {"kernel": kernel.view(np.int32), "scale": scale}},  # a dtype, same bytes
              {"block": {"kernel": kernel.reshape(3, 2), "scale": scale}},  # a shape, same bytes
              {"block": {"kernel_": kernel, "scale": scale}},  # a name, same bytes
              {"block": {"kernel": kernel}, "scale": scale}]  # a place in the tree
    assert len({digest, *map(weights_digest, others)}) == 1 + len(others)


def test_a_converted_folder_whose_params_were_replaced_is_refused_at_load_and_its_config_is_fingerprinted(
        tmp_path, converted):
    """The fingerprint reads the digest a conversion recorded, not the weights: a folder's params/
    replaced by another conversion's would be sampled under the recorded weights' name, so a load
    checks them. An edit of the config is another checkpoint; a folder converted before digests were
    recorded keeps the fingerprint of its files, which the sampling jobs that read it recorded."""
    from pixelflow_jax import CheckpointError, storage
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.checkpoints.checkpoint import read_config, restore_params, save_checkpoint

    fingerprint = lambda folder: resolve_checkpoint(str(folder)).fingerprint()
    original = converted["c2i_tiny"]
    config = read_config(original)
    other = tmp_path / "other"
    # Given as float64, they are saved, and hashed, as the config's float32 that a load reads.
    save_checkpoint(str(other), jax.tree.map(lambda p: np.asarray(p + 1e-3, np.float64),
                                             restore_params(original, config)), config)
    load_model(str(other))
    replaced = tmp_path / "replaced"
    shutil.copytree(original, replaced)
    shutil.rmtree(replaced / "params")
    shutil.copytree(other / "params", replaced / "params")
    assert fingerprint(replaced) == fingerprint(original)  # what the record says
    with pytest.raises(CheckpointError, match=rf"^{replaced}/params holds other weights than {replaced}/"
                                              r"pixelflow_config.json records \(its params/ replaced by another "
                                              r"conversion's, or files damaged .*\): convert again$"):
        load_model(str(replaced))

    edited = tmp_path / "edited"
    shutil.copytree(original, edited)
    with json_edited(edited / "pixelflow_config.json") as values:
        values["scheduler"]["num_train_timesteps"] = 999
    assert fingerprint(edited) != fingerprint(original)
    with json_edited(edited / "pixelflow_config.json") as values:
        values["scheduler"]["num_train_timesteps"] = 1000
        values["weights_sha256"] = "0" * 63
    with pytest.raises(CheckpointError, match=r"weights_sha256 must be the 64 hex digits of a sha256, got '0{63}' "
                                              r"\(convert the checkpoint again"):
        load_model(str(edited))
    with json_edited(edited / "pixelflow_config.json") as values:
        del values["weights_sha256"]  # as converted before 2026-12-03
    assert fingerprint(edited) == storage.fingerprint(str(edited), ("pixelflow_config.json", "params"))
    assert fingerprint(edited) != fingerprint(original)
    load_model(str(edited))


def test_the_same_weights_converted_into_a_bucket_have_the_fingerprint_they_have_here(converted, bucket):
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.checkpoints.checkpoint import read_config, restore_params, save_checkpoint

    original, copy = converted["c2i_tiny"], f"{bucket}/c2i_tiny"
    config = read_config(original)
    save_checkpoint(copy, restore_params(original, config), config)
    assert resolve_checkpoint(copy).fingerprint() == resolve_checkpoint(original).fingerprint()
    load_model(copy)  # its digest checked as it is read from there


def test_loading_a_converted_folder_reads_its_config_once(converted, monkeypatch):
    """Each read of pixelflow_config.json is a request in a bucket: restore_params read it again for
    the weights' digest, which read_checkpoint had read with the config."""
    from pixelflow_jax import storage

    reads, read_json = [], storage.read_json
    monkeypatch.setattr(storage, "read_json", lambda path, *a, **k: reads.append(path) or read_json(path, *a, **k))
    load_model(converted["c2i_tiny"])
    assert [os.path.basename(path) for path in reads].count("pixelflow_config.json") == 1, reads


def test_what_an_export_says_of_its_weights_is_kept_through_a_conversion_and_an_export_again(tmp_path, converted):
    """An export of a run names the run, step and set of weights it holds in its config.yaml; its
    conversion here, and that conversion's export, said nothing of them, so a colleague handed the
    round trip's folder could no longer tell the EMA from the raw weights."""
    from pixelflow_jax.api import resolve_checkpoint, weights_note
    from pixelflow_jax.checkpoints.checkpoint import read_record
    from pixelflow_jax.checkpoints.torch_io import EXPORT_MARK, export_note

    export = tmp_path / "export"
    shutil.copytree(fixture_dir("c2i_tiny"), export)
    note = "weights: the raw weights, not their EMA (--weights=model), of step 7 of the training run in the folder a"
    (export / "config.yaml").write_text(f"{EXPORT_MARK}\n# {note}\n" + (export / "config.yaml").read_text())
    round_trip, again = tmp_path / "round_trip", tmp_path / "again"
    result = run_converter(f"--torch_checkpoint={export / 'model.pt'}", f"--output={round_trip}")
    assert result.returncode == 0, result.stderr
    assert read_record(str(round_trip)).weights_note == weights_note(resolve_checkpoint(str(round_trip))) == note
    result = run_converter("--to_torch", f"--jax_checkpoint={round_trip}", f"--output={again}")
    assert result.returncode == 0, result.stderr
    assert export_note(str(again)) == note
    assert read_record(converted["c2i_tiny"]).weights_note is None  # the release's own folder says nothing
    assert "weights_note" not in (pathlib.Path(converted["c2i_tiny"]) / "pixelflow_config.json").read_text()
