"""Where an adapter lives: a local folder, or a Hugging Face Hub id resolved through ``huggingface_hub``'s cache.

:func:`resolve` turns what a user passes to :func:`funcpeft.load` (or ``funcpeft inspect``) into a local folder
holding ``adapter_config.json`` and the weights, the way ``peft.PeftModel.from_pretrained`` does:

- a path that exists is a local folder and always wins (``subfolder`` is joined to it; ``revision`` means
  nothing for a folder and is ignored, as in PEFT);
- otherwise a string that is a valid repo id (``name`` or ``org/name``) is downloaded with ``hf_hub_download``
  into (or found in) its cache: ``adapter_config.json``, then ``adapter_model.safetensors``, falling back to the
  legacy ``adapter_model.bin``. With ``HF_HUB_OFFLINE=1`` only the cache is read (``local_files_only``). The
  weights are fetched at the commit the config came from, so a branch that moves between the two downloads
  cannot pair one commit's config with another's weights. The folder returned is the cache's snapshot folder
  ``models--org--name/snapshots/<commit>[/<subfolder>]``, which :mod:`funcpeft.io` reads as any local folder
  (same safety checks, same ``.bin`` fallback);
- anything else is a missing folder (``FileNotFoundError``).

``huggingface_hub`` is optional (``pip install funcpeft[hub]``) and imported only when a Hub id is resolved.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

__all__ = ["Source", "resolve", "is_repo_id"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
EXTRA = "pip install 'funcpeft[hub]'"

# huggingface_hub's `validate_repo_id` rules, restated so that a missing folder can be told from a Hub id
# without importing huggingface_hub (which may not be installed).
_REPO_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", flags=re.ASCII)


class Source(NamedTuple):
    """A resolved adapter location: the local ``folder`` to read, and where it came from on the Hub (if it did)."""

    folder: Path
    repo_id: str | None = None  # None: a local folder
    revision: str | None = None  # as asked for (None: the repo's default branch)
    commit: str | None = None  # the commit the cached files belong to
    subfolder: str | None = None


def is_repo_id(value: object) -> bool:
    """Whether ``value`` is a string huggingface_hub accepts as a repo id (``name`` or ``namespace/name``)."""
    return (
        isinstance(value, str)
        and value.count("/") <= 1
        and _REPO_ID.fullmatch(value) is not None
        and "--" not in value
        and ".." not in value
        and not value.endswith(".git")
    )


def _describe(repo_id: str, revision: str | None, subfolder: str | None) -> str:
    parts = [repr(repo_id)]
    if revision is not None:
        parts.append(f"revision {revision!r}")
    if subfolder:
        parts.append(f"subfolder {subfolder!r}")
    return ", ".join(parts)


def resolve(
    path: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None, weights: bool = True
) -> Source:
    """The local folder to read for ``path``: the folder itself, or the Hub id's snapshot folder in the cache.

    Args:
        path: an adapter folder, or a Hub repo id (``"org/name"``). A path that exists always wins.
        revision: a branch, tag or commit hash of the Hub repo (default: its default branch). Ignored for a
            local folder, as in PEFT.
        subfolder: the folder inside the repo (or the local folder) that holds the adapter.
        weights: also fetch the weights (``adapter_model.safetensors``, else ``adapter_model.bin``); without it
            only the config is fetched (for :func:`funcpeft.io.read_config`).

    Raises:
        FileNotFoundError: ``path`` is neither an existing path nor a repo id; or the Hub repo, revision or files
            do not exist; or, offline (``HF_HUB_OFFLINE=1``) or unable to reach the Hub, the cache lacks them.
            The message names the id, revision and subfolder.
        ImportError: ``path`` is a Hub id (no such local path exists) and huggingface_hub is not installed.
        ValueError: ``subfolder`` or ``revision`` is not one huggingface_hub accepts.
    """
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"`revision` must be a branch, tag or commit hash (a str) or None, got {revision!r}.")
    if subfolder is not None and not isinstance(subfolder, (str, os.PathLike)):
        raise TypeError(f"`subfolder` must be a str or None, got {subfolder!r}.")
    subfolder = os.fspath(subfolder) if subfolder else None
    local = Path(path)
    if local.exists() or not is_repo_id(path):
        return Source(local / subfolder if subfolder else local)
    return _from_hub(str(path), revision, subfolder, weights)


def _from_hub(repo_id: str, revision: str | None, subfolder: str | None, weights: bool) -> Source:
    where = _describe(repo_id, revision, subfolder)
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants
        from huggingface_hub.utils import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:
        raise ImportError(
            f"No local folder {repo_id!r} exists, and loading it as a Hugging Face Hub id ({where}) needs "
            f"huggingface_hub, which is not installed: `{EXTRA}` (or pass the adapter folder's path)."
        ) from err

    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    cache = getattr(constants, "HF_HUB_CACHE", None)
    not_local = f"No local folder {repo_id!r} exists, so it was looked up as a Hugging Face Hub id"

    def fetch(name: str, at: str | None) -> str:
        return hub.hf_hub_download(repo_id, name, subfolder=subfolder, revision=at, local_files_only=offline)

    def unavailable(what: str, err: Exception, at: str | None) -> FileNotFoundError:
        shown = where if at in (None, revision) else f"{where} (commit {at})"
        if offline:
            why = (
                f"the Hub is offline (HF_HUB_OFFLINE=1) and the cache {cache!r} has no {what} for {shown}; "
                "download it once while online, or pass the adapter folder's path"
            )
        else:
            why = f"the cache {cache!r} has no {what} for {shown} and the Hub could not be reached: {_line(err)}"
        return FileNotFoundError(f"{not_local}, but {why}.")

    try:
        config_file = fetch(CONFIG_NAME, revision)
    except LocalEntryNotFoundError as err:  # before EntryNotFoundError: a subclass of it in huggingface_hub >= 1
        raise unavailable(CONFIG_NAME, err, revision) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"{not_local}: the Hub repo {where} has no {_in(subfolder, CONFIG_NAME)}, so it is not a PEFT adapter "
            "(a base model? pass `subfolder=` if the adapter lives in a folder of the repo)."
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:  # GatedRepoError is a RepositoryNotFoundError
        raise FileNotFoundError(f"{not_local}, but the Hub answered for {where}: {_line(err)}") from err
    except ValueError as err:  # HFValidationError: a subfolder or revision huggingface_hub refuses
        raise ValueError(f"Cannot look up {where} on the Hugging Face Hub: {_line(err)}") from err

    file = Path(config_file)
    depth = len(Path(subfolder).parts) if subfolder else 0
    snapshot = file.parents[depth]  # the cache's .../snapshots/<commit>[/<subfolder>]/adapter_config.json
    commit = snapshot.name if snapshot.parent.name == "snapshots" else None
    source = Source(file.parent, repo_id, revision, commit, subfolder)
    if not weights:
        return source
    try:
        fetch(WEIGHTS_NAME, commit or revision)
        return source
    except LocalEntryNotFoundError as err:
        first: Exception = err  # offline, or the Hub unreachable: the legacy file may still be cached
    except EntryNotFoundError as err:
        first = err  # the repo has no safetensors: PEFT then reads adapter_model.bin
    try:
        fetch(LEGACY_WEIGHTS_NAME, commit or revision)
    except LocalEntryNotFoundError as err:
        raise unavailable(f"{WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME})", err, commit) from first
    except EntryNotFoundError as err:
        if isinstance(first, LocalEntryNotFoundError):  # the .bin is missing on the Hub, the safetensors uncached
            raise unavailable(WEIGHTS_NAME, first, commit) from err
        raise FileNotFoundError(
            f"{not_local}: the Hub repo {where} (commit {commit}) has {_in(subfolder, CONFIG_NAME)} but neither "
            f"{WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}."
        ) from err
    return source


def _in(subfolder: str | None, name: str) -> str:
    return f"{subfolder}/{name}" if subfolder else name


def _line(err: Exception) -> str:
    """huggingface_hub's message on one line (its errors span several, with request ids)."""
    return " ".join(str(err).split())
