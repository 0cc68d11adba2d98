"""lmi_source: where a model comes from, for the three ways of the toolkit's handler (lmi_deepspeed).

Copied verbatim beside lmi_deepspeed.py into every DeepSpeed-line image (/opt/lmi/python); lmi_deepspeed's
`start` calls `resolve` before a way is chosen, so every way gets a local directory. What `option.model_id`
(DJL passes it as `model_id`) may be:
    (unset)              the model directory DJL hands over (`model_dir`, /opt/ml/model)
    a local directory    as is: DJL hands this over for an s3:// model too, after downloading it itself
                         (ModelInfo.downloadS3: /opt/djl/bin/s5cmd sync into $SERVING_DOWNLOAD_DIR/download/<hash>)
    org/name             a Hugging Face Hub repository (HF_MODEL_ID=org/name: DJL's ModelStore turns it into
                         option.model_id, with HF_REVISION as option.revision): downloaded here, once per host
A hub download:
  - the revision is option.revision (a branch, tag or commit; default main), the token HF_TOKEN, read by
    huggingface_hub itself from the environment (never passed, logged or answered here); HF_ENDPOINT and
    HF_HUB_OFFLINE=1 (a pre-seeded cache, HF_HUB_CACHE/HF_HOME) are huggingface_hub's own;
  - weights as safetensors where the repository has them; pickle weights (.bin, .pt, .pth, .ckpt) only with
    option.allow_pickle=true (unpickling can run code), refused in one line otherwise;
  - into <SERVING_DOWNLOAD_DIR>/download/<hash>, where SERVING_DOWNLOAD_DIR defaults to DJL's cache directory
    (DJL_CACHE_DIR, else ~/.djl.ai), as DJL's own downloads go (ModelInfo.downloadS3ToDownloadDir) and with
    its hash (the first 20 bytes of the SHA-256, in hex, of "hf://<org/name>@<revision>");
  - into a temporary directory beside it, renamed when complete: a crashed, refused or partial download is
    removed and never used;
  - once per host: every rank takes an exclusive lock (fcntl) on <hash>.lock; the first downloads, the others
    wait for it and then find the directory complete;
  - refused in one line when what arrived has neither config.json nor model_index.json, or when its
    config.json asks for the repository's own code (auto_map): the handler never runs a model's own code.
Every refusal is an OptionError: DJL fails the load with "Failed to initialize model: <that line>".
Importing this module costs nothing: huggingface_hub loads only for a hub id.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

from lmi_deepspeed import OptionError, first_line  # beside this file, in the image's /opt/lmi/python

log = logging.getLogger("lmi_source")

# What a hub download fetches besides weights: configurations, tokenizers (sentencepiece, tiktoken, BPE
# merges), chat templates, generation settings; in every subfolder (fnmatch's * crosses /), as a Diffusers
# pipeline has them. Never code (*.py).
CONFIG_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
SAFETENSORS = ("*.safetensors",)
PICKLE = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_PICKLE_SUFFIXES = tuple(p[1:] for p in PICKLE)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve(props: dict) -> dict:
    """DJL's properties with `model_id` set to a local model directory (downloaded from the hub when it names
    a hub repository), or OptionError in one line."""
    model_id = str(props.get("model_id") or "").strip()
    if not model_id:
        return props
    if "://" in model_id:
        if model_id.startswith("s3://"):
            raise OptionError(f"option.model_id={model_id}: DJL Serving downloads an s3:// model itself (with "
                              "/opt/djl/bin/s5cmd) and hands the handler the local copy; this one reached the "
                              "handler undownloaded: serve it through DJL Serving, or download it and give the "
                              "local directory")
        raise OptionError(f"option.model_id={model_id!r}: give a local directory, s3://bucket/prefix/ (DJL "
                          "downloads it) or a Hugging Face Hub id (org/name)")
    if ".." in model_id.replace("\\", "/").split("/"):
        raise OptionError(f"option.model_id={model_id!r}: neither a local directory nor a Hugging Face Hub id "
                          "(not org/name; a path with .. is refused); give an absolute model directory, "
                          "s3://bucket/prefix/ or org/name")
    if os.path.isdir(model_id):
        refuse_remote_code(model_id, model_id)
        return props
    repo_id = hub_id(model_id)
    revision = str(props.get("revision") or "").strip() or None
    allow_pickle = str(props.get("allow_pickle", "false")).strip().lower() == "true"
    return {**props, "model_id": download(repo_id, revision, allow_pickle)}


def hub_id(model_id: str) -> str:
    """`org/name`, validated as huggingface_hub validates repository ids, or OptionError: a path that does not
    exist (absolute, relative, with ..) is no hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None
    if not HUB_ID.fullmatch(model_id) or ".." in model_id:
        problem = "not org/name"
    else:
        try:
            validate_repo_id(model_id)
        except HFValidationError as exc:
            problem = (str(exc).strip().splitlines() or ["not a repository id"])[0]
    if problem:
        raise OptionError(f"option.model_id={model_id!r}: neither a local directory nor a Hugging Face Hub id "
                          f"({problem}); give a model directory, s3://bucket/prefix/ or org/name")
    return model_id


def djl_hash(text: str) -> str:
    """DJL's Utils.hash: the first 20 bytes of the SHA-256 of the UTF-8 text, in hex (40 characters)."""
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def download_root() -> str:
    """Where downloads go, by DJL's rule: $SERVING_DOWNLOAD_DIR, else DJL's cache directory ($DJL_CACHE_DIR,
    else ~/.djl.ai, or the temporary directory's .djl.ai when home is not writable)."""
    root = os.environ.get("SERVING_DOWNLOAD_DIR") or os.environ.get("DJL_CACHE_DIR")
    if not root:
        home = os.path.expanduser("~")
        root = os.path.join(home if os.access(home, os.W_OK) else tempfile.gettempdir(), ".djl.ai")
    return root


def download(repo_id: str, revision: str | None, allow_pickle: bool) -> str:
    """A hub repository at a revision -> its local directory, downloaded once per host."""
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        return _from_cache(repo_id, revision, allow_pickle)
    parent = os.path.join(download_root(), "download")
    target = os.path.join(parent, djl_hash(f"hf://{repo_id}@{revision or 'main'}"))
    if os.path.isdir(target):
        return target
    import fcntl

    try:
        os.makedirs(parent, exist_ok=True)
        lock = open(target + ".lock", "a")  # noqa: SIM115 (held until the download is renamed into place)
    except OSError as exc:
        raise OptionError(f"option.model_id={repo_id}: cannot write the download directory {parent} "
                          f"({exc.strerror}); set SERVING_DOWNLOAD_DIR to a writable volume") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank of this host may be downloading it: wait for it
        if os.path.isdir(target):
            log.info("lmi_source: %s is already downloaded to %s", repo_id, target)
            return target
        tmp = tempfile.mkdtemp(prefix="tmp", dir=parent)
        try:
            _fetch(repo_id, revision, allow_pickle, tmp)
            check_downloaded(repo_id, tmp, allow_pickle)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("lmi_source: %s@%s downloaded to %s", repo_id, revision or "main", target)
    return target


def _fetch(repo_id: str, revision: str | None, allow_pickle: bool, into: str) -> None:
    from huggingface_hub import HfApi, snapshot_download

    where = f"option.model_id={repo_id}" + (f" (option.revision={revision})" if revision else "")
    try:
        info = HfApi().model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or ()]
        patterns = list(CONFIG_PATTERNS)
        if any(f.endswith(".safetensors") for f in files):
            patterns += SAFETENSORS
        elif any(f.endswith(_PICKLE_SUFFIXES) for f in files):
            if not allow_pickle:
                raise OptionError(f"{where}: the repository has its weights only as pickle files (.bin, .pt), "
                                  "which can run code when loaded; set option.allow_pickle=true if you trust it")
            patterns += PICKLE
        log.info("lmi_source: downloading %s@%s (%s)", repo_id, info.sha or revision or "main", ", ".join(patterns))
        snapshot_download(repo_id, revision=info.sha or revision, allow_patterns=patterns, local_dir=into)
    except OptionError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OptionError(f"{where}: the disk filled up while downloading into {os.path.dirname(into)} "
                              f"({exc.strerror}); nothing was kept; free space or set SERVING_DOWNLOAD_DIR to a "
                              "larger volume") from None
        raise OptionError(f"{where}: {_hub_problem(exc)}") from None
    except Exception as exc:  # huggingface_hub's errors (not found, revision, gated, HTTP)
        raise OptionError(f"{where}: {_hub_problem(exc)}") from None


def _hub_problem(exc: Exception) -> str:
    """huggingface_hub's error as one line, with what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RevisionNotFoundError):
        return "the repository has no such revision; give an existing branch, tag or commit (HF_REVISION)"
    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its terms on the hub and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return ("no such repository on the hub, or it is private: check the id, or set HF_TOKEN to a token that "
                "can read it")
    if isinstance(exc, LocalEntryNotFoundError):
        return ("the hub could not be reached and the model is not in the local cache; check the network "
                "(HF_ENDPOINT) or seed the cache and set HF_HUB_OFFLINE=1")
    if isinstance(exc, HFValidationError):
        return "not a valid revision"
    return f"the download failed: {type(exc).__name__}: {first_line(exc)}"


def _from_cache(repo_id: str, revision: str | None, allow_pickle: bool) -> str:
    """HF_HUB_OFFLINE=1: the repository's snapshot in the pre-seeded hub cache, as it is."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception as exc:
        raise OptionError(f"option.model_id={repo_id}: HF_HUB_OFFLINE is set and the hub cache (HF_HUB_CACHE) "
                          f"has no snapshot of it{' at ' + revision if revision else ''}; seed the cache or "
                          f"unset HF_HUB_OFFLINE ({type(exc).__name__})") from None
    check_downloaded(repo_id, path, allow_pickle)
    return path


def check_downloaded(repo_id: str, path: str, allow_pickle: bool) -> None:
    """What arrived is a model this handler loads without running its code, or OptionError."""
    names = []
    for root, _, files in os.walk(path):
        names += [os.path.relpath(os.path.join(root, f), path) for f in files]
    if not {"config.json", "model_index.json"} & set(names):
        raise OptionError(f"option.model_id={repo_id}: what was downloaded has no config.json (nor a Diffusers "
                          "model_index.json); give a Transformers or Diffusers model repository")
    if not allow_pickle and not any(n.endswith(".safetensors") for n in names) and \
            any(n.endswith(_PICKLE_SUFFIXES) for n in names):
        raise OptionError(f"option.model_id={repo_id}: its weights are only pickle files (.bin, .pt), which can "
                          "run code when loaded; set option.allow_pickle=true if you trust it")
    refuse_remote_code(repo_id, path)


def refuse_remote_code(model_id: str, path: str) -> None:
    """A config.json with auto_map needs the repository's own Python code, which this handler never runs."""
    try:
        with open(os.path.join(path, "config.json")) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return  # no readable config.json: the way that loads it says what is wrong
    if isinstance(config, dict) and config.get("auto_map"):
        raise OptionError(f"option.model_id={model_id}: its config.json needs the repository's own code "
                          f"(auto_map: {', '.join(sorted(config['auto_map']))}), which this handler never runs; "
                          "serve a model Transformers implements")
