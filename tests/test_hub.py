"""hf:// checkpoints and T5 folders, read offline from a Hub cache the test fills itself in the
Hub's cache layout (no test touches the network)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cpu_devices, fixture_dir
from pixelflow_jax import load_model
from pixelflow_jax.checkpoints.checkpoint import CheckpointError
from pixelflow_jax.checkpoints.hub import HubPath
from test_t5 import write_tiny_t5_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_holding_the_c2i_release(monkeypatch, snapshot, requests=None):
    """huggingface_hub.snapshot_download of a repository holding the c2i_tiny release in c2i/: the
    files its patterns ask for are copied into `snapshot` (at COMMIT), each request appended to `requests`."""
    import fnmatch

    import huggingface_hub

    release = fixture_dir("c2i_tiny")

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        if requests is not None:
            requests.append((repo_id, revision, tuple(allow_patterns)))
        for name in os.listdir(release):
            if any(fnmatch.fnmatch(f"c2i/{name}", pattern) for pattern in allow_patterns):
                os.makedirs(snapshot / "c2i", exist_ok=True)
                shutil.copy(os.path.join(release, name), snapshot / "c2i" / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def put_in_hub_cache(home: str, repo_id: str, files: dict[str, str]) -> None:
    """What huggingface_hub leaves in HF_HOME after downloading `files` (repo path -> local file)
    of repo_id at COMMIT from its main branch."""
    repo = os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name, source in files.items():
        target = os.path.join(repo, "snapshots", COMMIT, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(source, target)


def split_t5_into_shards(folder: str, out: str) -> dict[str, str]:
    """The tiny T5 as two safetensors shards, the second holding only decoder tensors (as a large
    seq2seq T5 can ship); returns the repo files, the decoder shard left out of the cache."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(folder, "model.safetensors"))
    decoder = {k for k in tensors if k.startswith(("decoder.", "lm_head."))}
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in decoder},
              "model-00002-of-00002.safetensors": {k: tensors[k] for k in decoder}}
    os.makedirs(out)
    weight_map = {}
    for name, part in shards.items():
        save_file(part, os.path.join(out, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    for name in ("config.json", "spiece.model"):
        shutil.copy(os.path.join(folder, name), out)
    return {name: os.path.join(out, name) for name in ("config.json", "spiece.model", "model.safetensors.index.json",
                                                       "model-00001-of-00002.safetensors")}


@pytest.mark.parametrize("path,expected", [
    ("hf://ShoufaChen/PixelFlow-Class2Image", HubPath("ShoufaChen/PixelFlow-Class2Image")),
    ("hf://google/flan-t5-xl@v1.0/", HubPath("google/flan-t5-xl", "v1.0")),
    (f"hf://me/runs@{COMMIT}/xl/step_5", HubPath("me/runs", COMMIT, "xl/step_5")),
    ("hf://me/runs/sub", HubPath("me/runs", None, "sub")),
    ("hf://me/runs//sub/", HubPath("me/runs", None, "sub")),  # not "/sub": an absolute path under the snapshot
    ("hf://me/runs/v1..2/step_5", HubPath("me/runs", None, "v1..2/step_5")),  # '..' inside a name is a name
    ("hf://me/runs@refs/pr/12/xl", HubPath("me/runs", "refs/pr/12", "xl")),  # a pull request's ref, not "refs"
    ("hf://me/runs@refs/convert/safetensors", HubPath("me/runs", "refs/convert/safetensors")),  # a conversion's ref
    ("hf://me/runs@refs/convert/safetensors/xl/", HubPath("me/runs", "refs/convert/safetensors", "xl")),
    ("hf://me/runs@refs", HubPath("me/runs", "refs")),  # a branch named refs
])
def test_hub_paths_parse(path, expected):
    assert HubPath.parse(path) == expected


@pytest.mark.parametrize("path", ["hf://just-a-name", "hf://me/repo/../../etc", "hf://me/re po"])
def test_bad_hub_paths_are_refused_with_the_format(path):
    with pytest.raises(CheckpointError, match="hf://OWNER/NAME|not allowed"):
        HubPath.parse(path)


@pytest.mark.parametrize("path,problem", [
    ("hf://./b", "'./b' is not a Hub repository id"), ("hf://../b", "'../b' is not a Hub repository id"),
    ("hf://me/.", "'me/.' is not a Hub repository id"), ("hf://me/-x-", "'me/-x-' is not a Hub repository id"),
    ("hf://me/a--b", "'me/a--b' is not a Hub repository id"),
    ("hf://me/runs@..", "'..' is not a Hub revision"), ("hf://me/runs@./xl", "'.' is not a Hub revision"),
])
def test_a_hub_path_of_dots_for_its_owner_name_or_revision_is_refused_before_the_hub_is_asked(path, problem):
    """hf://./b and hf://../b passed the parse (the owner's pattern takes dots): huggingface_hub's
    HFValidationError then came out of a sampling job as a traceback. A revision of '..' was sent
    to the Hub, where a URL's '..' climbs out of the revision, and into the cache's refs/ folder."""
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {problem}")) as refused:
        HubPath.parse(path)
    if "revision" in problem:  # each names its fix
        assert str(refused.value).endswith("write a branch, tag or commit, refs/pr/N or refs/convert/NAME after the "
                                           "'@'"), refused.value
    else:  # with huggingface_hub's rule in its own words
        assert re.search(r"Hub repository id \(.*[a-z].*\): write hf://OWNER/NAME as the repository's page names "
                         r"it\Z", str(refused.value)), refused.value


@pytest.mark.parametrize("path", ["hf://me/runs@refs/pr/draft", "hf://me/runs@refs/pr/3x/xl",
                                  "hf://me/runs@refs/heads", "hf://me/runs@refs/convert"])
def test_a_mistyped_hub_ref_is_refused_with_the_refs_read(path):
    """'@refs/pr/draft' was read as the revision 'refs' and the subfolder 'pr/draft': the download
    then failed with "no revision 'refs'", not naming the refs a Hub path takes."""
    with pytest.raises(CheckpointError, match=r"@refs/\S+ is not a Hub revision: write @refs/pr/N .*, "
                                              r"@refs/convert/NAME, or a branch or tag as @NAME"):
        HubPath.parse(path)


@pytest.mark.parametrize("path,meant", [
    ("hf://me/runs@refs/heads/main", "the branch main: write hf://me/runs@main "),
    ("hf://me/runs@refs/heads/dev-2/xl/", "the branch dev-2: write hf://me/runs@dev-2/xl "),
    ("hf://me/runs@refs/tags/v1.0", "the tag v1.0: write hf://me/runs@v1.0 "),
])
def test_a_branch_or_tag_by_its_full_git_name_is_told_its_bare_name(path, meant):
    """huggingface_hub takes branches and tags by name (its hf:// paths read only refs/pr/N and
    refs/convert/NAME as refs): @refs/heads/main was told to write 'a branch or tag as @NAME'."""
    with pytest.raises(CheckpointError, match=re.escape(f"is git's full name of {meant}")):
        HubPath.parse(path)


@pytest.mark.parametrize("address,meant", [
    ("https://huggingface.co/ShoufaChen/PixelFlow-Class2Image", "hf://ShoufaChen/PixelFlow-Class2Image"),
    ("https://huggingface.co/google/flan-t5-xl/", "hf://google/flan-t5-xl"),
    ("https://hf.co/google/flan-t5-xl", "hf://google/flan-t5-xl"),  # the Hub's short address
    ("https://huggingface.co/me/runs/tree/v1.0/xl/step_5/", "hf://me/runs@v1.0/xl/step_5"),
    ("https://huggingface.co/me/runs/blob/main/xl/model.pt", "hf://me/runs@main/xl/model.pt"),
    ("http://www.huggingface.co/me/runs/resolve/0123abc/config.yaml", "hf://me/runs@0123abc/config.yaml"),
    # a pull request's files: the page writes the ref's '/' as %2F
    ("https://huggingface.co/me/runs/tree/refs%2Fpr%2F3/xl", "hf://me/runs@refs/pr/3/xl"),
])
def test_a_hub_web_pages_address_is_refused_with_the_hf_path_that_reads_it(address, meant):
    """A model page's address copied from the browser was refused as 'unsupported URL scheme
    https://; paths are local or gs://', without the hf:// path that reads the same repository."""
    from pixelflow_jax import storage
    from pixelflow_jax.validation import user_path

    refusal = rf"is the address of a Hugging Face Hub web page, which is not read as files: write {meant} \("
    with pytest.raises(CheckpointError, match=refusal):
        load_model(address)
    with pytest.raises(storage.StorageError, match=rf"^--config.sample.checkpoint: {address} {refusal}"):
        user_path("--config.sample.checkpoint", address, hub_allowed=True)
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme https?://"):  # where hf:// is no input
        user_path("--output", address)
    HubPath.parse(meant)  # what the refusal names is a Hub path


@pytest.mark.parametrize("path,meant", [
    ("ShoufaChen/PixelFlow-Class2Image", "hf://ShoufaChen/PixelFlow-Class2Image"),  # a repo id, as transformers takes
    ("huggingface.co/ShoufaChen/PixelFlow-Class2Image", "hf://ShoufaChen/PixelFlow-Class2Image"),  # no https://
    ("hf.co/me/runs/tree/v1.0/xl", "hf://me/runs@v1.0/xl"),
    ("runs/missing", None),  # runs/ is a local folder: a mistyped run, no Hub id
    ("runs/demo/checkpoints/9", None),
    ("gone/demo/checkpoints", None),  # three parts: a local path, whatever its first folder
    (".runs/xl", None),  # a Hub name does not start with a dot: a hidden folder's path
])
def test_a_missing_checkpoint_that_reads_as_a_hub_repository_names_its_hf_path(path, meant, tmp_path, monkeypatch):
    """--config.train.init_from=ShoufaChen/PixelFlow-Class2Image (the Hub's repository id, as other
    Hub tools take it) or a web page's address without https:// was told only 'does not exist'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert str(error.value).startswith(f"checkpoint {path} does not exist")
    assert (f"write {meant}" in str(error.value)) if meant else "hf://" not in str(error.value), str(error.value)


@pytest.mark.parametrize("address", ["https://huggingface.co/datasets/me/pictures", "https://example.com/a/b",
                                     "https://huggingface.co/me",
                                     # a dataset or space without an owner, or a page of the site: no model's page
                                     "https://huggingface.co/datasets/mnist", "https://huggingface.co/spaces/gradio",
                                     "https://huggingface.co/docs/hub", "https://huggingface.co/papers/2504.07963",
                                     "https://huggingface.co/collections/me",
                                     "https://huggingface.co/organizations/new",
                                     "https://huggingface.co/settings/tokens", "https://huggingface.co/blog/pixelflow"])
def test_other_web_addresses_are_refused_as_before(address):
    with pytest.raises(CheckpointError, match=r"unsupported URL scheme https://"):
        load_model(address)


OFFLINE_SCRIPT = r"""
import json, sys
import numpy as np
from pixelflow_jax import CheckpointError, load_model
from pixelflow_jax.text.prompts import PromptEncoder

fixture, t5_local = sys.argv[1:3]
results = {}
hub_model, hub_config = load_model("hf://pixelflow-test/checkpoints/c2i_tiny")
local_model, local_config = load_model(fixture)
x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
call = lambda m: np.asarray(m(x, np.array([500.0, 20.0], np.float32), class_labels=np.array([1, 7])))
results["same_forward"] = bool(np.array_equal(call(hub_model), call(local_model))) and hub_config == local_config
results["pinned_revision"] = load_model("hf://pixelflow-test/checkpoints@%s/c2i_tiny")[1] == local_config
results["file_means_folder"] = load_model("hf://pixelflow-test/checkpoints/c2i_tiny/model.pt")[1] == local_config
# The config comes before the weights: a job checks it first (here the weights are in no cache).
from pixelflow_jax import api
config_only = api.resolve_checkpoint("hf://pixelflow-test/checkpoints/c2i_tiny_config_only")
results["config_before_weights"] = api.checkpoint_config(config_only) == local_config
try:
    api.read_checkpoint(config_only)
    results["weights_missing"] = "loaded"
except CheckpointError as e:
    results["weights_missing"] = str(e)
prompts = ["a cat on the moon", "Zebra!"]
hub_t5, local_t5 = PromptEncoder("hf://pixelflow-test/t5-tiny"), PromptEncoder(t5_local)
results["same_embeddings"] = bool(np.array_equal(np.asarray(hub_t5.encode(prompts)[0]),
                                                 np.asarray(local_t5.encode(prompts)[0])))
for name, path in (("missing_repo", "hf://pixelflow-test/not-cached"),
                   ("no_checkpoint_in_root", "hf://pixelflow-test/checkpoints")):
    try:
        load_model(path)
        results[name] = "loaded"
    except CheckpointError as e:
        results[name] = str(e)
try:
    PromptEncoder("hf://pixelflow-test/t5-tiny/no-such-subfolder")
    results["t5_subfolder"] = "loaded"
except CheckpointError as e:
    results["t5_subfolder"] = str(e)
print("RESULTS " + json.dumps(results))
""" % COMMIT


def test_checkpoints_and_t5_resolve_from_an_offline_hub_cache(tmp_path):
    home = str(tmp_path / "hf_home")
    release = fixture_dir("c2i_tiny")
    put_in_hub_cache(home, "pixelflow-test/checkpoints",
                     {f"c2i_tiny/{name}": os.path.join(release, name) for name in ("config.yaml", "model.pt")})
    put_in_hub_cache(home, "pixelflow-test/checkpoints",
                     {"c2i_tiny_config_only/config.yaml": os.path.join(release, "config.yaml")})
    t5 = str(tmp_path / "t5")
    write_tiny_t5_folder(t5)
    put_in_hub_cache(home, "pixelflow-test/t5-tiny", split_t5_into_shards(t5, str(tmp_path / "t5_sharded")))

    env = {**os.environ, "HF_HOME": home, "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": cpu_devices(1, one_process=False)}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, release, t5], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    assert results["same_forward"] and results["pinned_revision"] and results["file_means_folder"]
    assert results["config_before_weights"]
    assert results["weights_missing"].startswith(f"hf://pixelflow-test/checkpoints@{COMMIT}/c2i_tiny_config_only: "
                                                 "its weights (model.pt or params/) are not in the Hub cache and "
                                                 "HF_HUB_OFFLINE is set")
    assert results["same_embeddings"]  # read without the decoder-only shard, which is not in the cache
    assert "hf://pixelflow-test/not-cached" in results["missing_repo"]
    assert "HF_HUB_OFFLINE is set" in results["missing_repo"]
    assert "holds no PixelFlow checkpoint" in results["no_checkpoint_in_root"]
    assert "looked for config.json" in results["t5_subfolder"] and "model.pt" not in results["t5_subfolder"]
    assert not os.path.exists(os.path.join(home, "hub", "models--pixelflow-test--t5-tiny", "snapshots", COMMIT,
                                           "model-00002-of-00002.safetensors"))


def test_a_hub_checkpoint_is_fetched_config_first_then_weights_at_the_same_commit(tmp_path, monkeypatch):
    """The config alone comes with resolve_checkpoint (a job checks it before gigabytes of weights
    arrive); read_checkpoint fetches the weights at the commit the config came from, even if the
    branch has moved since."""
    from pixelflow_jax import api

    snapshot, requests = tmp_path / "snapshots" / COMMIT, []
    hub_holding_the_c2i_release(monkeypatch, snapshot, requests)
    source = api.resolve_checkpoint("hf://me/pixelflow@main/c2i")
    assert requests == [("me/pixelflow", "main", ("c2i/config.yaml", "c2i/pixelflow_config.json"))]
    assert not (snapshot / "c2i" / "model.pt").exists() and source.label == f"hf://me/pixelflow@{COMMIT}/c2i"
    assert api.checkpoint_config(source).model.num_classes == 1000
    config, _ = api.read_checkpoint(source)
    assert requests[1] == ("me/pixelflow", COMMIT, ("c2i/config.yaml", "c2i/pixelflow_config.json", "c2i/model.pt",
                                                    "c2i/params/**"))
    assert config == load_model(fixture_dir("c2i_tiny"))[1]


def test_a_hub_sampling_jobs_rerun_is_the_same_job_its_record_holds_the_weights_fingerprint(tmp_path, monkeypatch):
    """A job records its checkpoint's fingerprint: taken before the weights were fetched, it would be
    the config's alone, and the rerun of an interrupted job (its weights in the cache by then) would
    be refused as a job of other weights."""
    from test_sample_cli import sample_in_process

    hub_holding_the_c2i_release(monkeypatch, tmp_path / "snapshots" / COMMIT)
    job = lambda: sample_in_process(tmp_path / "run", "hf://me/pixelflow@main/c2i", monkeypatch, num_images=2)
    job()
    os.remove(tmp_path / "run" / "samples" / "000001.png")
    assert job()[1] == [[1] * 8]  # the missing image, padded to 8 devices


def test_a_hub_release_folder_without_config_yaml_is_refused_before_its_weights_download(tmp_path, monkeypatch):
    """The release's text-to-image repository holds model.pt alone: sampling it downloaded the
    gigabytes first, then said to convert it."""
    import huggingface_hub

    from pixelflow_jax import api

    snapshot, requests = tmp_path / "snapshots" / COMMIT, []

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        requests.append(tuple(allow_patterns))
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    class Api:
        def file_exists(self, repo_id, filename, revision=None):
            requests.append(("file_exists", repo_id, filename, revision))
            return filename == "t2i/model.pt"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    source = api.resolve_checkpoint("hf://me/pixelflow/t2i")
    with pytest.raises(CheckpointError, match=rf"hf://me/pixelflow@{COMMIT}/t2i holds model.pt without the "
                                              "config.yaml .* convert it once with convert_torch_ckpt.py"):
        api.checkpoint_config(source)
    assert requests == [("t2i/config.yaml", "t2i/pixelflow_config.json"),
                        ("file_exists", "me/pixelflow", "t2i/model.pt", COMMIT)]  # no weights asked for


def test_a_hub_path_to_a_file_two_folders_down_means_its_folder(tmp_path, monkeypatch):
    """.../xl/c2i/model.pt as copied from the Hub's web page: the checkpoint is xl/c2i, as for a
    file one folder down."""
    import huggingface_hub

    from pixelflow_jax import api

    release, snapshot, requests = fixture_dir("c2i_tiny"), tmp_path / "snapshots" / COMMIT, []

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        requests.append(tuple(allow_patterns))
        os.makedirs(snapshot / "xl" / "c2i", exist_ok=True)
        shutil.copy(os.path.join(release, "config.yaml"), snapshot / "xl" / "c2i")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = api.resolve_checkpoint("hf://me/pixelflow@main/xl/c2i/model.pt")
    assert requests == [("xl/c2i/config.yaml", "xl/c2i/pixelflow_config.json")]
    assert source.label == f"hf://me/pixelflow@{COMMIT}/xl/c2i" and source.folder == str(snapshot / "xl" / "c2i")


@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"])
def test_a_hub_cache_variable_naming_a_file_is_named_with_its_value_and_fix(tmp_path, variable):
    """huggingface_hub said "Not a directory: '.../token'" (HF_HOME) or that the files were not in
    the cache (HF_HUB_CACHE), naming neither variable. It reads them once, at import: a subprocess.
    HUGGINGFACE_HUB_CACHE, HF_HUB_CACHE's older name, was called HF_HUB_CACHE's default."""
    not_a_folder = tmp_path / "hf_home"
    not_a_folder.write_text("")
    env = {**os.environ, "HF_HOME": str(tmp_path / "unused"), "HF_HUB_OFFLINE": "1"}
    for unset in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(unset, None)
    env[variable] = str(not_a_folder)
    script = ("from pixelflow_jax.checkpoints import hub\n"
              "try:\n    hub.checkpoint_folder('hf://me/pixelflow')\nexcept hub.CheckpointError as e:\n    print(e)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.startswith(f"hf://me/pixelflow: {variable}={str(not_a_folder)!r} is a file, not a folder "
                                    "(huggingface_hub keeps its downloads"), result.stdout + result.stderr
    assert f"point {variable} at a folder, or unset it" in result.stdout
    assert not (tmp_path / "unused").exists()


def test_a_path_under_a_broken_link_is_not_called_a_hub_repository(tmp_path, monkeypatch):
    """A link runs -> a disk not mounted, given as runs/xl, was told it might name a Hugging Face Hub
    repository: the check for a local folder runs followed the link."""
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "unmounted", tmp_path / "runs")
    with pytest.raises(CheckpointError) as error:
        load_model("runs/xl")
    assert str(error.value) == "checkpoint runs/xl does not exist"
