"""Checkpoints and T5 folders on the Hugging Face Hub: `hf://OWNER/NAME[@REVISION][/SUBFOLDER]`.

Files go through huggingface_hub's standard cache (HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads
the cache only; HF_TOKEN or `hf auth login` for gated and private repos), and only the files the
reader needs are fetched: a PixelFlow folder's config and weights, a T5 folder's config, tokenizer
and the weight shards that hold encoder tensors (never the decoder-only shards, nor the same
weights in a second format). REVISION is a branch, tag or commit without '/', a pull request's
refs/pr/N, or a conversion's refs/convert/NAME.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.checkpoint import CheckpointError
from pixelflow_jax.error_text import first_line

PREFIX = "hf://"
# The Hub's revisions with a '/' are its own refs; any other '/' after the revision starts the subfolder.
_HUB_REFS = r"refs/pr/\d+|refs/convert/[\w.-]+"
_HUB_PATH = re.compile(r"hf://(?P<owner>[\w.-]+)/(?P<name>[\w.-]+)"
                       rf"(?:@(?P<revision>{_HUB_REFS}|[\w.-]+))?(?:/(?P<subfolder>.+))?")

# A PixelFlow folder: the release's (config.yaml + model.pt) or a converted one. Its config comes
# first, so that a job can check it before the weights (gigabytes) are downloaded.
CONFIG_PATTERNS = ("config.yaml", "pixelflow_config.json")
WEIGHT_PATTERNS = ("model.pt", "params/**")
CHECKPOINT_PATTERNS = CONFIG_PATTERNS + WEIGHT_PATTERNS
# Files a path copied from the Hub's web page may end in; the checkpoint is the folder holding them.
CHECKPOINT_FILES = ("config.yaml", "model.pt", "pixelflow_config.json")


def is_hub_path(path: str) -> bool:
    return str(path).startswith(PREFIX)


# The address of a repository's web page, or of a folder or file shown in it (what a browser's
# address bar gives); huggingface_hub reads none of them.
# A ref's '/' is '%2F' there (tree/refs%2Fpr%2F3/...).
_WEB_ADDRESS = re.compile(r"https?://(?:www\.)?(?:huggingface|hf)\.co/(?P<repo>[\w.-]+/[\w.-]+)"
                          r"(?:/(?:tree|blob|resolve)/(?P<revision>[\w.%-]+)(?P<rest>/.*)?)?/?")
# First parts of the site's addresses that are no model's owner (a dataset's or space's page, the docs).
_SITE_SECTIONS = ("datasets", "spaces", "docs", "blog", "papers", "collections", "organizations", "settings")


def from_web_address(path: str) -> str | None:
    """The hf:// path of a Hub web page's address (a model page, a folder or a file of it), for a
    refusal to name; None for any other path (datasets and spaces are no checkpoints)."""
    match = _WEB_ADDRESS.fullmatch(str(path))
    if not match or match["repo"].split("/")[0] in _SITE_SECTIONS:
        return None
    revision = f"@{urllib.parse.unquote(match['revision'])}" if match["revision"] else ""
    rest = (match["rest"] or "").rstrip("/")
    return f"{PREFIX}{match['repo']}{revision}{rest}"


def web_address_refusal(path: str) -> str | None:
    """The words refusing a Hub web page's address where an hf:// path is read, or None."""
    hub_path = from_web_address(path)
    return (f"{path} is the address of a Hugging Face Hub web page, which is not read as files: write {hub_path} "
            "(hf://OWNER/NAME[@REVISION][/SUBFOLDER], read through the Hub's cache)" if hub_path else None)


def missing_path_hint(path: str) -> str:
    """For a local checkpoint path that does not exist, the hf:// path it was likely meant as: a Hub
    web page's address without its https://, or a repository id as other Hub tools take it
    (OWNER/NAME, where no local folder OWNER exists, nor a link of that name); '' otherwise."""
    text = str(path)
    if storage.is_url(text):
        return ""
    if meant := from_web_address(f"https://{text}"):
        return f": that is a Hub web page's address; write {meant} to read it from the Hub"
    if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", text) and not os.path.lexists(text.split("/")[0]):
        return f" (if it names a Hugging Face Hub repository: write {PREFIX}{text})"
    return ""


@dataclasses.dataclass(frozen=True)
class HubPath:
    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    @classmethod
    def parse(cls, path: str) -> "HubPath":
        match = _HUB_PATH.fullmatch(str(path).rstrip("/"))
        if not match:
            raise CheckpointError(f"{path} is not a Hub path: write hf://OWNER/NAME, optionally followed by "
                                  "@REVISION (a branch, tag or commit, refs/pr/N or refs/convert/NAME) and /SUBFOLDER")
        subfolder = (match["subfolder"] or "").strip("/")
        if match["revision"] == "refs" and (bare := re.fullmatch(r"(heads|tags)/([\w.-]+)(/.*)?", subfolder)):
            # git's full name of a branch or tag: huggingface_hub documents them by their names, and
            # its own hf:// paths give a '/' in a revision to refs/pr/N and refs/convert/NAME only
            meant = f"{PREFIX}{match['owner']}/{match['name']}@{bare[2]}{bare[3] or ''}"
            kind = "branch" if bare[1] == "heads" else "tag"
            raise CheckpointError(f"{path}: @refs/{bare[1]}/{bare[2]} is git's full name of the {kind} {bare[2]}: "
                                  f"write {meant} (a Hub revision is a branch, tag or commit by its name, "
                                  "refs/pr/N or refs/convert/NAME)")
        if match["revision"] == "refs" and subfolder:
            # '@refs/pr/draft' is no branch 'refs' with a subfolder 'pr/draft', but a mistyped ref
            raise CheckpointError(f"{path}: @refs/{subfolder} is not a Hub revision: write @refs/pr/N (a pull "
                                  "request, N its number), @refs/convert/NAME, or a branch or tag as @NAME, "
                                  "then /SUBFOLDER if any")
        if ".." in subfolder.split("/"):
            raise CheckpointError(f"{path}: '..' is not allowed in a Hub subfolder")
        repo_id = f"{match['owner']}/{match['name']}"
        check_repo_id(path, repo_id)
        if match["revision"] in (".", ".."):  # sent to the Hub, a URL's '..' climbs out of the revision
            raise CheckpointError(f"{path}: {match['revision']!r} is not a Hub revision: write a branch, tag or "
                                  "commit, refs/pr/N or refs/convert/NAME after the '@'")
        return cls(repo_id, match["revision"], subfolder)

    def pinned(self, commit: str) -> str:
        """This path at an exact commit: what a run records, so a rerun reads the same files."""
        return f"{PREFIX}{self.repo_id}@{commit}" + (f"/{self.subfolder}" if self.subfolder else "")

    def __str__(self) -> str:
        return (f"{PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
                + (f"/{self.subfolder}" if self.subfolder else ""))


def check_repo_id(path: str, repo_id: str) -> None:
    """Refuses, naming `path`, an OWNER/NAME that huggingface_hub refuses (hf://../b, hf://me/a--b):
    its own error came out of a job as a traceback."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:  # its words give the rule (letters, digits, '-', '_', '.'; ends; length)
        raise CheckpointError(f"{path}: {repo_id!r} is not a Hub repository id ({first_line(e).rstrip('.')}): write "
                              "hf://OWNER/NAME as the repository's page names it") from None


def offline() -> bool:
    """Whether HF_HUB_OFFLINE asks huggingface_hub to read its cache only (its own truthy values)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _download(hub: HubPath, patterns) -> str:
    """The local snapshot folder (of the repo root) holding the files that match `patterns` in the
    subfolder; every Hub failure becomes one CheckpointError saying what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    check_cache_folders(hub)
    prefix = f"{hub.subfolder}/" if hub.subfolder else ""
    try:
        return huggingface_hub.snapshot_download(hub.repo_id, revision=hub.revision,
                                                 allow_patterns=[prefix + p for p in patterns])
    except errors.GatedRepoError:
        raise CheckpointError(f"{hub} is a gated repository: accept its terms on huggingface.co/{hub.repo_id}, "
                              "then log in (`hf auth login`) or set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{hub}: repository {hub.repo_id} not found on the Hub (check the name; a private "
                              "repository needs `hf auth login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{hub}: repository {hub.repo_id} has no revision {hub.revision!r}") from None
    except (errors.LocalEntryNotFoundError, getattr(errors, "IncompleteSnapshotError", OSError)) as e:
        hint = ("HF_HUB_OFFLINE is set and the files are not in the cache: unset it and run once with network "
                "access to fill the cache") if offline() else ("the Hub cannot be reached and the files are not in "
                                                             "the cache; check the network")
        raise CheckpointError(f"{hub}: {hint} ({type(e).__name__})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{hub}: download failed: {first_line(e)}") from None


def check_cache_folders(hub: HubPath) -> None:
    """Refuses a HF_HOME or HF_HUB_CACHE that is (or lies inside) a file: huggingface_hub's own
    error named neither ("Not a directory: '.../token'"), or said the files were not in the cache."""
    from huggingface_hub import constants

    for variable, folder, default, holds in (
            ("HF_HOME", constants.HF_HOME, "~/.cache/huggingface", "its downloads and login token"),
            (hub_cache_variable(), constants.HF_HUB_CACHE, "$HF_HOME/hub", "its downloads")):
        folder = os.path.abspath(folder)  # a relative one's parents, up to the working folder, are looked at too
        file = storage.file_in_the_way(folder)
        if file is None:
            continue
        setting = f"{variable}={os.environ[variable]!r}" if variable in os.environ else \
            f"{variable} is not set, and its default {folder!r}"
        problem = "is a file, not a folder" if file == folder else f"cannot be a folder, as {file!r} is a file"
        fix = f"or unset it (default: {default})" if variable in os.environ else f"or move {file!r} away"
        raise CheckpointError(f"{hub}: {setting} {problem} (huggingface_hub keeps {holds} in that folder): point "
                              f"{variable} at a folder, {fix}")


def hub_cache_variable() -> str:
    """The variable that sets huggingface_hub's download folder: HF_HUB_CACHE, or where only it is
    set, its older name HUGGINGFACE_HUB_CACHE (still read, and set by older container images)."""
    legacy = "HUGGINGFACE_HUB_CACHE"
    return legacy if legacy in os.environ and "HF_HUB_CACHE" not in os.environ else "HF_HUB_CACHE"


def _folder(snapshot: str, hub: HubPath, patterns) -> str:
    folder = os.path.join(snapshot, hub.subfolder) if hub.subfolder else snapshot
    if not os.path.isdir(folder):
        where = f"subfolder {hub.subfolder!r} of " if hub.subfolder else ""
        raise CheckpointError(f"{hub}: none of the needed files are in {where}{hub.repo_id} "
                              f"(looked for {', '.join(patterns)})")
    return folder


def checkpoint_folder(path: str) -> tuple[str, str]:
    """(local folder, the Hub path pinned to the commit it holds) of a PixelFlow checkpoint on the
    Hub, with its config; download_weights(pinned path) adds the weights. A path to one of its
    files (.../model.pt) means the folder, as a local path does."""
    hub = HubPath.parse(path)
    parent, _, name = hub.subfolder.rpartition("/")
    if name in CHECKPOINT_FILES:
        hub = dataclasses.replace(hub, subfolder=parent)
    snapshot = _download(hub, CONFIG_PATTERNS)
    commit = os.path.basename(os.path.normpath(snapshot))
    has_config = lambda folder: any(os.path.exists(os.path.join(folder, n)) for n in CONFIG_PATTERNS)
    if not has_config(os.path.join(snapshot, hub.subfolder)):
        if lists_model_pt(dataclasses.replace(hub, revision=commit)):  # the job names what is missing, and
            return os.path.join(snapshot, hub.subfolder), hub.pinned(commit)  # download_weights fetches it
        snapshot = _download(hub, CHECKPOINT_PATTERNS)  # whatever is there says what is missing
    folder = _folder(snapshot, hub, CHECKPOINT_PATTERNS)
    if not has_config(folder) and not os.path.exists(os.path.join(folder, "model.pt")):
        raise CheckpointError(f"{hub} holds no PixelFlow checkpoint: expected config.yaml + model.pt (a release "
                              "folder) or pixelflow_config.json + params/ (a converted one)")
    return folder, hub.pinned(commit)


def lists_model_pt(hub: HubPath) -> bool:
    """Whether the Hub lists a model.pt in the folder: a release folder without config.yaml (the
    text-to-image one) is then refused before gigabytes arrive. False when the listing fails
    (offline: the cache answers instead)."""
    import huggingface_hub

    name = f"{hub.subfolder}/model.pt" if hub.subfolder else "model.pt"
    try:
        return bool(huggingface_hub.HfApi().file_exists(hub.repo_id, name, revision=hub.revision))
    except Exception:  # offline, or any Hub error: _download reports those with their fix
        return False


def download_weights(pinned_path: str) -> None:
    """Adds the weights to the folder checkpoint_folder gave for this pinned path (same commit)."""
    hub = HubPath.parse(pinned_path)
    folder = _folder(_download(hub, CHECKPOINT_PATTERNS), hub, CHECKPOINT_PATTERNS)
    if not any(os.path.exists(os.path.join(folder, name)) for name in ("model.pt", "params")):
        raise CheckpointError(f"{hub}: its weights (model.pt or params/) are not " + (
            "in the Hub cache and HF_HUB_OFFLINE is set: unset it and run once with network access" if offline()
            else "in the repository: a release folder holds config.yaml + model.pt, a converted one "
                 "pixelflow_config.json + params/"))


def t5_folder(path: str) -> str:
    """A local T5 folder for a Hub T5 repo: config, tokenizer and the weights of the encoder only."""
    from pixelflow_jax.text.t5_convert import fetch_encoder_files

    hub = HubPath.parse(path)
    try:
        return fetch_encoder_files(lambda names: _folder(_download(hub, names), hub, names))
    except CheckpointError as e:  # a download error names the Hub path already
        raise CheckpointError(str(e) if str(e).startswith(str(hub)) else f"{hub}: {e}") from None
