"""SageMaker's SM_VLLM_* environment -> `vllm serve` argv, then exec it (the vLLM image's entrypoint helper).

Standard library only: the file is copied into the vLLM image as is. Run it as `python3 sm_vllm.py` (exec
vllm serve) or `python3 sm_vllm.py --dry-run` (print the command, shell-quoted, and exit).

The mapping is the one AWS's SageMaker vLLM containers ship (facts from aws/deep-learning-containers
@dceae132:scripts/docker/vllm/sagemaker_args.py and test/vllm/test_sagemaker_args.py; the code is ours):
- `--port 8080` first (a later SM_VLLM_PORT wins, as argparse keeps the last value);
- the model: SM_VLLM_MODEL if set, else /opt/ml/model when it holds files, else HF_MODEL_ID;
- every SM_VLLM_<NAME> in sorted order becomes `--<name>` (lower case, `_` -> `-`):
  `true` -> the bare flag, `false` -> nothing, empty -> the bare flag;
  a JSON array -> one token per element (vLLM's list flags are nargs="+"; an empty array drops the flag),
  except for the flags vLLM types as one JSON value (SINGLE_TOKEN_FLAGS);
  a JSON object -> one token, verbatim; several whitespace-separated objects -> one token each;
  anything else (a path with spaces, a Jinja template, malformed JSON) -> one token, untouched.

Where this refuses what AWS's helper passes on (one line, exit 2; each is a deliberate difference):
- no model at all: vLLM would serve its default model, fetched from the Hugging Face Hub;
- SM_VLLM_API_KEY, or SM_VLLM_HF_TOKEN with a token: a secret on argv is readable in every process's
  /proc/<pid>/cmdline and in the startup log; vLLM reads VLLM_API_KEY and huggingface_hub HF_TOKEN instead;
- an empty SM_VLLM_MODEL, and a name that cannot be a flag (e.g. SM_VLLM_, SM_VLLM_MAX-LEN);
- an s3:// model without SM_VLLM_LOAD_FORMAT=runai_streamer (or runai_streamer_sharded): vLLM 0.33.0's other
  loaders have no object-store path (model_loader/default_loader.py would take s3://… for a Hub id), and a
  gs:// or az:// model: the image carries the Run:ai streamer's S3 backend only.

The model may be a Hugging Face Hub id (vLLM downloads it itself; a gated one reads HF_TOKEN from the
environment), a directory, or s3://bucket/prefix/ read by the Run:ai model streamer, as AWS's containers take
it (SM_VLLM_MODEL=s3://… with SM_VLLM_LOAD_FORMAT=runai_streamer). The streamer reads the endpoint and
credentials from the environment (AWS_ENDPOINT_URL or RUNAI_STREAMER_S3_ENDPOINT, AWS_REGION, the instance
role); none of it goes on argv.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Mapping

PREFIX = "SM_VLLM_"
PORT = "8080"  # SageMaker's container contract
MODEL_DIR = "/opt/ml/model"  # where SageMaker unpacks ModelDataUrl / ModelDataSource
COMMAND = ("vllm", "serve")

# vLLM 0.33.0 vllm/entrypoints/common/cli_args.py (FrontendArgs._customize_cli_kwargs) strips nargs from
# these: the first three are typed json.loads (the array is the value), --middleware is action="append".
SINGLE_TOKEN_FLAGS = frozenset({"--allowed-origins", "--allowed-methods", "--allowed-headers", "--middleware"})

# Object stores vLLM 0.33.0 hands to the Run:ai streamer (vllm/transformers_utils/runai_utils.py
# SUPPORTED_SCHEMES), the backend this image installs for them, and the load formats that read them
# (vllm/model_executor/model_loader/__init__.py: runai_streamer, runai_streamer_sharded).
OBJECT_STORES = ("s3://", "gs://", "az://")
STREAMED = ("s3://",)
STREAMER_FORMATS = ("runai_streamer", "runai_streamer_sharded")

# Never on argv: SM_VLLM_<name> -> the variable its reader takes instead.
SECRETS = {"API_KEY": "VLLM_API_KEY", "HF_TOKEN": "HF_TOKEN"}

_NAME = re.compile(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)*")


class BadValue(ValueError):
    """An SM_VLLM_* setting this helper refuses; str() is the one-line message."""


def flag_for(key: str) -> str:
    """SM_VLLM_TENSOR_PARALLEL_SIZE -> --tensor-parallel-size."""
    name = key[len(PREFIX):]
    if not _NAME.fullmatch(name):
        raise BadValue(f"{key}: not a vLLM flag name; use letters, digits and single underscores after "
                       f"{PREFIX} (e.g. {PREFIX}MAX_MODEL_LEN=4096 for --max-model-len 4096)")
    return "--" + name.lower().replace("_", "-")


def _token(element: object) -> str:
    """One element of a JSON array as one argv token."""
    if isinstance(element, (dict, list)):
        return json.dumps(element, separators=(",", ":"))
    if isinstance(element, bool):
        return "true" if element else "false"
    return "" if element is None else str(element)


def _objects(text: str) -> list[dict] | None:
    """`{...} {...}` -> its objects; None unless the whole text is a run of JSON objects."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        found.append(obj)
        while at < len(text) and text[at].isspace():
            at += 1
    return found or None


def tokens_for(flag: str, value: str) -> list[str] | None:
    """The argv tokens after `flag`: [] for a bare flag, None to leave the flag out (an empty array)."""
    if not value:
        return []
    text = value.strip()
    if flag in SINGLE_TOKEN_FLAGS:
        return [value]
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
        except ValueError:
            return [value]  # vLLM reports it, against the value as written
        return [_token(e) for e in parsed] or None
    if text.startswith("{") and text.endswith("}"):
        objects = _objects(text)
        if objects and len(objects) > 1:
            return [json.dumps(o, separators=(",", ":")) for o in objects]
    return [value]


def model_args(env: Mapping[str, str], model_dir: str = MODEL_DIR) -> list[str]:
    """--model from /opt/ml/model or HF_MODEL_ID when SM_VLLM_MODEL is not set (the loop adds that one)."""
    if f"{PREFIX}MODEL" in env:
        if not env[f"{PREFIX}MODEL"].strip():
            raise BadValue(f"{PREFIX}MODEL is empty; set it to a model directory or a Hugging Face id, or unset it "
                           f"to use {model_dir}")
        return []
    try:
        if os.listdir(model_dir):
            return ["--model", model_dir]
    except OSError:
        pass  # missing or unreadable: no mounted model
    if env.get("HF_MODEL_ID", "").strip():
        return ["--model", env["HF_MODEL_ID"]]
    raise BadValue(f"no model: {model_dir} is empty, missing or unreadable and neither {PREFIX}MODEL nor HF_MODEL_ID "
                   f"is set (vLLM would fetch its default model); mount the model at {model_dir} or set {PREFIX}MODEL")


def check_object_store(model: str, source: str, env: Mapping[str, str]) -> None:
    """An s3:// model needs the Run:ai streamer's load format; gs:// and az:// have no backend here."""
    lowered = model.strip().lower()
    if not lowered.startswith(OBJECT_STORES):
        return
    scheme = lowered.split("://")[0] + "://"
    if scheme not in STREAMED:
        raise BadValue(f"{source}={model[:120]}: this image streams models from s3:// only (the Run:ai streamer's S3 "
                       f"backend); copy the model to S3 or mount it at {MODEL_DIR}")
    fmt = env.get(f"{PREFIX}LOAD_FORMAT", "").strip().lower()
    if fmt not in STREAMER_FORMATS:
        raise BadValue(f"{source}={model[:120]}: vLLM reads an s3:// model only with the Run:ai model streamer; set "
                       f"{PREFIX}LOAD_FORMAT=runai_streamer" + (f" (not {fmt!r})" if fmt else ""))


def build_args(env: Mapping[str, str], model_dir: str = MODEL_DIR) -> list[str]:
    """The argv after `vllm serve` for this environment. Raises BadValue."""
    model = model_args(env, model_dir)
    if model:
        check_object_store(model[1], "HF_MODEL_ID", env)
    else:
        check_object_store(env[f"{PREFIX}MODEL"], f"{PREFIX}MODEL", env)
    args = ["--port", PORT, *model]
    for key in sorted(k for k in env if k.startswith(PREFIX)):
        flag, value = flag_for(key), env[key]
        lowered = value.strip().lower()
        secret = SECRETS.get(key[len(PREFIX):].upper())
        if secret and lowered not in ("", "true", "false"):
            raise BadValue(f"{key}: a secret on vllm's command line is readable by every process and lands in "
                           f"logs; set {secret} instead (read from the environment)")
        if lowered == "true":
            args.append(flag)
        elif lowered != "false" and (tokens := tokens_for(flag, value)) is not None:
            args += [flag, *tokens]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--dry-run"]):
        print("usage: sm_vllm.py [--dry-run]  (settings come from SM_VLLM_* environment variables)", file=sys.stderr)
        return 2
    try:
        args = build_args(os.environ)
    except BadValue as exc:
        print(f"sm_vllm: error: {exc}", file=sys.stderr)
        return 2
    command = [*COMMAND, *args]
    if argv:
        print(shlex.join(command))
        return 0
    print(f"sm_vllm: {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"sm_vllm: error: cannot run {command[0]}: {exc.strerror}; is vLLM installed on PATH?", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
