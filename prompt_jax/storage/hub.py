"""Frozen models by Hugging Face Hub name: `hf://OWNER/NAME` or `hf://OWNER/NAME@REVISION`
(a branch, tag or commit) resolves to a local snapshot directory through
`huggingface_hub.snapshot_download`, which then loads like any Hugging Face directory.

Only the files a frozen T5 needs are fetched (`FILES`: config.json, generation_config.json,
spiece.model and the safetensors weights). The Hub's own cache and settings apply:
`HF_HUB_CACHE` (or `HF_HOME`), `HF_HUB_OFFLINE=1` (the cache only, no network) and `HF_TOKEN`.
Both are read when a name is resolved, not when huggingface_hub was imported. A name is resolved
once per process (`snapshot_dir`), so the config, the weights and the run record of one run
come from the same commit. `pinned_name` names that commit (`hf://OWNER/NAME@<40 hex>`).

huggingface_hub is optional (`pip install "prompt_jax[hub]"`); only resolving a name needs it.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from prompt_jax.interop import hf

PREFIX = "hf://"
# What a frozen T5 needs from a repository: its config, weights (one file or shards with their
# index) and SentencePiece model. PyTorch .bin weights need torch, which we do not use.
FILES = ("config.json", "generation_config.json", "spiece.model", "model.safetensors",
         "model.safetensors.index.json", "model-*-of-*.safetensors")
T5_MODEL_TYPES = ("t5", "mt5")
INSTALL_HINT = 'pip install "prompt_jax[hub]"'

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_NAME = re.compile(rf"(?P<repo>(?:{_PART}/)?{_PART})(?:@(?P<revision>[^\s@]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = ("1", "ON", "YES", "TRUE")

# (repo, revision, cache dir, offline) -> snapshot directory, for this process.
_resolved: dict[tuple[str, Optional[str], str, bool], str] = {}


def is_hub_name(path) -> bool:
  """Whether `path` is a Hub name (`hf://...`), as opposed to a local path or `builtin:`."""
  return isinstance(path, str) and path.startswith(PREFIX)


def parse(name: str) -> tuple[str, Optional[str]]:
  """`hf://OWNER/NAME[@REVISION]` -> (repo id, revision or None); anything else raises one
  ValueError naming it."""
  match = _NAME.fullmatch(name[len(PREFIX):]) if is_hub_name(name) else None
  repo = match and match["repo"]
  if not match or "--" in repo or ".." in repo:
    raise ValueError(f"{name!r} is not a Hugging Face Hub model name: expected "
                     "hf://OWNER/NAME or hf://OWNER/NAME@REVISION (a branch, tag or commit)")
  return repo, match["revision"]


def cache_dir() -> str:
  """The Hub cache huggingface_hub uses: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else
  HF_HOME/hub (HF_HOME defaults to $XDG_CACHE_HOME/huggingface, ~/.cache/huggingface)."""
  env = os.environ
  path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
  if not path:
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    path = os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")
  return os.path.expandvars(os.path.expanduser(path))


def offline() -> bool:
  """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value: the cache only."""
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
  return value.strip().upper() in _TRUE


def snapshot_dir(name: str) -> str:
  """The local snapshot directory of the Hub model `name` (`hf://OWNER/NAME[@REVISION]`),
  downloaded into the Hub cache if needed (only `FILES`), checked to be a T5 with safetensors
  weights. Every failure is one line naming `name`: a malformed name, huggingface_hub missing,
  an unknown repository or revision, a repository absent from the cache when offline, a model
  that is not a T5, no weights."""
  repo, revision = parse(name)
  key = (repo, revision, cache_dir(), offline())
  if key in _resolved and os.path.isdir(_resolved[key]):
    return _resolved[key]
  path = _download(name, repo, revision, key[2], key[3])
  _check_snapshot(name, path)
  _resolved[key] = path
  return path


def commit_of(name: str) -> str:
  """The commit `name` resolves to (its snapshot directory is named by it)."""
  return os.path.basename(os.path.normpath(snapshot_dir(name)))


def pinned_name(name: str) -> str:
  """`name` with its revision replaced by the commit it resolves to: `hf://OWNER/NAME@<commit>`
  names the same files however the branch moves later (what a run records)."""
  repo, _ = parse(name)
  return f"{PREFIX}{repo}@{commit_of(name)}"


def _download(name: str, repo: str, revision: Optional[str], cache: str, is_offline: bool) -> str:
  try:
    import huggingface_hub  # an optional dependency (the `hub` extra)
    from huggingface_hub import utils as hub_errors
  except ImportError as e:  # a RuntimeError: the CLI prints it as one line
    raise RuntimeError(f"{name} needs huggingface_hub: {INSTALL_HINT}") from e
  where = f"{name!r}"
  try:
    return huggingface_hub.snapshot_download(
        repo, revision=revision, cache_dir=cache, allow_patterns=list(FILES),
        local_files_only=is_offline)
  except hub_errors.RevisionNotFoundError as e:
    raise ValueError(f"{where}: the Hub has no revision {revision!r} of {repo}") from e
  except hub_errors.GatedRepoError as e:
    raise ValueError(f"{where}: {repo} is gated: accept its terms on the Hub and log in "
                     "(`hf auth login`, or set HF_TOKEN)") from e
  except hub_errors.RepositoryNotFoundError as e:
    raise ValueError(f"{where}: no model repository {repo} on the Hub (or it is private: log in "
                     "with `hf auth login`, or set HF_TOKEN)") from e
  except hub_errors.LocalEntryNotFoundError as e:
    at = f" at revision {revision!r}" if revision else ""
    if type(e).__name__ == "IncompleteSnapshotError":
      raise FileNotFoundError(f"{where}: the cached snapshot in {cache} lacks files and the Hub "
                              f"cannot be reached ({_first_line(e)})") from e
    if is_offline:
      raise FileNotFoundError(f"{where}: {repo}{at} is not in the Hub cache {cache} and "
                              "HF_HUB_OFFLINE is set; download it once with the network on, or "
                              "point HF_HUB_CACHE at a cache that holds it") from e
    raise FileNotFoundError(f"{where}: the Hub cannot be reached and {repo}{at} is not in the "
                            f"Hub cache {cache} ({_first_line(e)})") from e
  except hub_errors.HfHubHTTPError as e:
    raise OSError(f"{where}: the Hub refused the download ({_first_line(e)})") from e
  except ValueError as e:  # huggingface_hub's own name validation (HFValidationError)
    raise ValueError(f"{where}: {_first_line(e)}") from e


def _check_snapshot(name: str, path: str) -> None:
  config_path = os.path.join(path, "config.json")
  commit = os.path.basename(os.path.normpath(path))
  at = f" (commit {commit[:12]})" if _COMMIT.fullmatch(commit) else ""
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{name!r}{at} has no config.json: not a transformers model "
                            "repository")
  config = hf.read_json(config_path, "a JSON object of model settings")
  model_type = config.get("model_type")
  if model_type not in T5_MODEL_TYPES:
    raise ValueError(f"{name!r}{at} is not a T5: config.json model_type is {model_type!r}, "
                     f"expected one of {', '.join(T5_MODEL_TYPES)}")
  names = set(os.listdir(path))
  if not names & {"model.safetensors", "model.safetensors.index.json"}:
    raise FileNotFoundError(
        f"{name!r}{at} has no safetensors weights (model.safetensors or "
        "model.safetensors.index.json), the only format read without torch; name a revision "
        "that has them (@REVISION), or convert the PyTorch weights with transformers' "
        "save_pretrained(safe_serialization=True) and use that directory")


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]
