"""In-image checks of the vLLM profile: registered with lmi_check (lmi_check.py beside this file), which
`lmi test` mounts at /opt/lmi-check/lmi_check.py with this file beside it and loads it (`--profile`).

Like lmi_check itself: the standard library and what the vLLM image carries, nothing else. Core checks
(python-version, torch-version, torch-cuda, pip-check) stay in lmi_check; these add what only a vLLM image has.

- cpu tier (no GPU needed): vLLM's import, the routes of the server it builds (SageMaker's /ping
  and /invocations, the OpenAI routes), the entrypoint's SM_VLLM_* -> `vllm serve` mapping parsed by vLLM's
  own argument parser, and `vllm serve --help`.
- gpu tier: the kernels load and vLLM's platform is CUDA on the family's SM. (Serving a tiny model is the
  serving tier's, run from the host by buildkit/profiles/vllm.py; vLLM's version is lmi_check's generic
  `<dist>-version`.)

Facts these rely on, from the vllm 0.33.0 wheel (buildkit/data/vllm.yaml, sources `routes`, `linked`):
vllm/entrypoints/launchers/app.py build_app(args, supported_tasks) builds the FastAPI app without an engine;
vllm/entrypoints/common/cli_args.py make_arg_parser() is `vllm serve`'s parser; the compiled kernels need
libcuda.so.1 (the driver's), so they load only where a GPU driver is.

Without a GPU vLLM detects no platform (UnspecifiedPlatform, vllm/platforms/__init__.py), and building
`vllm serve`'s parser then fails ("Failed to infer device type": DeviceConfig, vllm/config/device.py), so
`vllm serve --help` fails too. VLLM_TARGET_DEVICE=cpu (vllm/envs.py; "an explicit CPU target is
authoritative") selects vLLM's CPU platform, which needs no driver: the parser and the app are built under
it, in a fresh interpreter (the platform is chosen once per process), by this file run as a script.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from importlib import metadata

from lmi_check import builtin, expect

ENTRYPOINT = "/usr/local/bin/dockerd-entrypoint.sh"  # `serve` -> sm_vllm.py -> exec vllm serve
PORT = 8080  # SageMaker's contract (sm_vllm.PORT)

# Route -> methods the image must serve (vllm 0.33.0: serve/sagemaker/api_router.py, openai/*/api_router.py,
# serve/instrumentator/health.py, openai/models/api_router.py).
ROUTES = {"/ping": {"GET", "POST"}, "/invocations": {"POST"}, "/health": {"GET"}, "/v1/models": {"GET"},
          "/v1/chat/completions": {"POST"}, "/v1/completions": {"POST"}}

# A set of SM_VLLM_* values (a boolean on, a boolean off, a JSON object, a JSON array, a number, a path) and
# what vLLM's own parser must make of the argv the entrypoint builds from them.
MAPPING_ENV = {"SM_VLLM_MODEL": "/opt/ml/model", "SM_VLLM_MAX_MODEL_LEN": "4096", "SM_VLLM_ENFORCE_EAGER": "true",
               "SM_VLLM_TRUST_REMOTE_CODE": "false", "SM_VLLM_LIMIT_MM_PER_PROMPT": '{"image": 2}',
               "SM_VLLM_SERVED_MODEL_NAME": '["tiny", "tiny-alias"]'}
MAPPING_ARGV = ["vllm", "serve", "--port", str(PORT), "--enforce-eager", "--limit-mm-per-prompt", '{"image": 2}',
                "--max-model-len", "4096", "--model", "/opt/ml/model", "--served-model-name", "tiny", "tiny-alias"]
MAPPING_PARSED = {"port": PORT, "enforce_eager": True, "trust_remote_code": False, "max_model_len": 4096,
                  "model": "/opt/ml/model", "served_model_name": ["tiny", "tiny-alias"],
                  "limit_mm_per_prompt": {"image": 2}}


CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu"}  # see the module's docstring
MARK = "vllm_check-result: "  # marks the result line: vLLM logs to stdout too


def _run(argv: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def _serve_parser():
    """`vllm serve`'s argument parser, built as vLLM builds it (vllm/entrypoints/cli/serve.py)."""
    from vllm.entrypoints.common.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def routes() -> dict:
    """Path -> methods of the app `vllm serve` builds (vLLM's build_app, no engine)."""
    from vllm.entrypoints.launchers.app import build_app

    app = build_app(_serve_parser().parse_args(["--model", "/opt/ml/model"]), supported_tasks=("generate",))
    found: dict[str, list] = {}
    for route in app.routes:
        found.setdefault(getattr(route, "path", ""), []).extend(getattr(route, "methods", None) or ())
    return found


def parse(*argv: str) -> dict:
    """What vLLM's own parser (and its pre-load validation) makes of `vllm serve <argv>`."""
    from vllm.entrypoints.common.cli_args import validate_parsed_serve_args

    parsed = _serve_parser().parse_args(list(argv))
    validate_parsed_serve_args(parsed)
    return {key: getattr(parsed, key, None) for key in MAPPING_PARSED}


TASKS = {"routes": routes, "parse": parse}


def _on_cpu_platform(task: str, *args: str) -> dict:
    """Run TASKS[task] in a fresh interpreter on vLLM's CPU platform; its JSON result."""
    out = _run([sys.executable, os.path.abspath(__file__), task, *args], env={**os.environ, **CPU_ENV}, timeout=280)
    results = [line[len(MARK):] for line in out.stdout.splitlines() if line.startswith(MARK)]
    expect(out.returncode == 0 and bool(results),
           f"{task} on vLLM's CPU platform exited {out.returncode}: {(out.stderr or out.stdout).strip()[-400:]}")
    return json.loads(results[-1])


# --- cpu tier -----------------------------------------------------------------------------------------------


@builtin("vllm-import", "cpu")
def vllm_import(claims):
    """`import vllm`, its server's modules and the GPU worker's model runner import without a GPU (the model
    runner pulls in the quantization kernels' Python side: FlashInfer, CUTLASS DSL, cuda.bindings, where a broken
    set fails at import: buildkit/data/vllm.yaml, source `clash`); the platform it detects is reported."""
    import vllm
    import vllm.entrypoints.launchers.app  # noqa: F401  (FastAPI app, routers, protocol models)
    import vllm.v1.worker.gpu_model_runner  # noqa: F401  (what every GPU worker imports at start)
    from vllm.platforms import current_platform

    expect(vllm.__version__ == metadata.version("vllm"),
           f"vllm.__version__ is {vllm.__version__}, its metadata says {metadata.version('vllm')}")
    return (f"vllm {vllm.__version__}, its server and its GPU model runner import; its platform here: "
            f"{type(current_platform).__name__}")


@builtin("vllm-routes", "cpu")
def vllm_routes(claims):
    """The app `vllm serve` builds has SageMaker's and the OpenAI routes."""
    found = {path: set(methods) for path, methods in _on_cpu_platform("routes").items()}
    missing = {path: sorted(methods - found.get(path, set())) for path, methods in ROUTES.items()
               if not methods <= found.get(path, set())}
    expect(not missing, f"routes missing from vLLM's app: {missing}")
    return f"{len(found)} routes, including " + ", ".join(f"{'|'.join(sorted(m))} {p}" for p, m in ROUTES.items())


@builtin("sm-vllm-mapping", "cpu")
def sm_vllm_mapping(claims):
    """The image's entrypoint (`serve --dry-run`) maps SM_VLLM_* to the argv AWS's containers pass, and
    vLLM's own parser reads that argv as meant (port 8080, booleans, a JSON object, a list)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **MAPPING_ENV}
    out = _run([ENTRYPOINT, "serve", "--dry-run"], env=env, timeout=60)
    expect(out.returncode == 0, f"{ENTRYPOINT} serve --dry-run exited {out.returncode}: {out.stderr.strip()[-300:]}")
    argv = shlex.split(out.stdout.strip())
    expect(argv == MAPPING_ARGV, f"SM_VLLM_* mapped to {argv}, expected {MAPPING_ARGV}")
    parsed = _on_cpu_platform("parse", *argv[2:])
    wrong = {k: parsed.get(k) for k, v in MAPPING_PARSED.items() if parsed.get(k) != v}
    expect(not wrong, f"vLLM's parser read {wrong}, expected {({k: MAPPING_PARSED[k] for k in wrong})}")
    return f"{len(MAPPING_ENV)} SM_VLLM_* values -> `{shlex.join(argv)}`, read by vLLM's parser as meant"


# Files two installed distributions both write, known to be harmless: path -> why.
SHARED_FILES_OK = {
    "build_backend.py": "a build-time helper that flashinfer-python 0.7.2.post1 and torch_c_dlpack_ext both ship at "
                        "the top of site-packages; it is their PEP 517 backend, nothing imports it at run time",
}


@builtin("installed-files-distinct", "cpu")
def installed_files_distinct(claims):
    """No file is written by two distributions: pip installs both without a word (and pip check passes), the
    later one silently wins. In vLLM 0.33.0's set, cuda-python 12.6.2.post1 (the monolithic release, chosen for
    flashinfer-python's `cuda-python>=12.0` when nothing excludes it) overwrote cuda-bindings 13.x's
    cuda/bindings/, so CUTLASS DSL failed on `cuda.bindings.runtime.cudaLibrary_t` (buildkit/data/vllm.yaml)."""
    owners: dict[str, set] = {}
    for dist in metadata.distributions():
        for path in dist.files or ():
            name = str(path)
            if not (name.startswith("..") or "__pycache__" in name or ".dist-info/" in name):
                owners.setdefault(name, set()).add(dist.metadata["Name"])
    shared = {name: sorted(who) for name, who in owners.items() if len(who) > 1 and name not in SHARED_FILES_OK}
    clashes: dict[tuple, list] = {}
    for name, who in sorted(shared.items()):
        clashes.setdefault(tuple(who), []).append(name)
    expect(not clashes, "files written by more than one distribution (the last install wins): " + "; ".join(
        f"{' and '.join(who)}: {len(names)} files, e.g. {names[0]}" for who, names in clashes.items()))
    return f"{len(owners)} installed files, each from one distribution (shared as known: {', '.join(SHARED_FILES_OK)})"


@builtin("vllm-serve-help", "cpu")
def vllm_serve_help(claims):
    out = _run(["vllm", "serve", "--help"], env={**os.environ, **CPU_ENV})
    expect(out.returncode == 0, f"vllm serve --help exited {out.returncode}: {out.stderr.strip()[-300:]}")
    expect("usage: vllm serve" in out.stdout, f"vllm serve --help printed no usage: {out.stdout.strip()[:200]}")
    return f"vllm serve --help (VLLM_TARGET_DEVICE=cpu): {len(out.stdout.splitlines())} lines"


@builtin("runai-streamer", "cpu")
def runai_streamer(claims):
    """The Run:ai model streamer (what `--load-format runai_streamer` reads s3:// models with) and its S3 backend
    are installed, vLLM finds it (not its placeholder), and its native reader streams a safetensors file written
    here back to the same tensors."""
    import tempfile

    import torch
    from runai_model_streamer import SafetensorsStreamer
    from safetensors.torch import save_file
    from vllm.transformers_utils import runai_utils

    versions = {d: metadata.version(d) for d in ("runai-model-streamer", "runai-model-streamer-s3")}
    import runai_model_streamer

    expect(runai_utils.runai_list_safetensors is runai_model_streamer.list_safetensors,
           "vLLM does not see runai_model_streamer (vllm/transformers_utils/runai_utils.py uses its placeholder)")
    want = {"a": torch.arange(12, dtype=torch.float16).reshape(3, 4), "b": torch.ones(5, dtype=torch.int32)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_file(want, path)
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(path)
            got = {name: tensor.clone() for name, tensor in streamer.get_tensors()}
    expect(set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want),
           f"the streamer read {sorted(got)} unequal to the file's {sorted(want)}")
    return ", ".join(f"{d} {v}" for d, v in versions.items()) + f"; streamed {len(got)} tensors equal to the file's"


# --- gpu tier -------------------------------------------------------------------------------------------------


@builtin("vllm-kernels", "gpu")
def vllm_kernels(claims):
    """vLLM's compiled kernels load (they need the driver's libcuda) and its platform is CUDA on the family's SM."""
    import importlib

    from vllm.platforms import current_platform

    for module in ("vllm._C_stable_libtorch", "vllm._moe_C_stable_libtorch"):
        importlib.import_module(module)
    expect(current_platform.is_cuda(), f"vLLM's platform is {type(current_platform).__name__}, not CUDA")
    cap = current_platform.get_device_capability()
    found = f"{cap.major}.{cap.minor}"
    expect(found == claims["sm"], f"vLLM sees sm_{found}, the image is for sm_{claims['sm']}")
    return f"kernels load; {current_platform.get_device_name()} (sm_{found})"


# --- streaming through /invocations (appended: token streaming) -------------------------------------------------

# vllm 0.33.0: serve/sagemaker/api_router.py `invocations` validates the body against the generate task's request
# types in order (generate/factories.py: ChatCompletionRequest -> openai/chat_completion/api_router.py
# create_chat_completion, CompletionRequest -> openai/completion/api_router.py create_completion) and awaits that
# endpoint, which answers a generator from the serving object (app.state.openai_serving_chat / _completion) as
# StreamingResponse(media_type="text/event-stream") and a whole response as JSON.
STREAM_BODIES = {"chat": ({"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4},
                          "ChatCompletionRequest"),
                 "completion": ({"prompt": "hi", "stream": True, "max_tokens": 4}, "CompletionRequest")}


def invocations_stream() -> dict:
    """POST /invocations of the app `vllm serve` builds with each `"stream": true` body, its model's serving objects
    replaced by recorders that answer three server-sent events (no engine: no GPU): which request type vLLM's
    router validated, whether it reached the endpoint with stream set, and the answer's status, media type and
    body."""
    from fastapi.testclient import TestClient
    from vllm.entrypoints.launchers.app import build_app

    app = build_app(_serve_parser().parse_args(["--model", "/opt/ml/model"]), supported_tasks=("generate",))
    seen: list = []

    class Recorder:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        async def answer(self, request, raw_request):
            seen.append({"kind": self.kind, "type": type(request).__name__, "stream": getattr(request, "stream", None)})

            async def events():
                for n in range(3):
                    yield f"data: {json.dumps({'kind': self.kind, 'n': n})}\n\n"
                yield "data: [DONE]\n\n"

            return events()

        create_chat_completion = create_completion = answer

    app.state.openai_serving_chat, app.state.openai_serving_completion = Recorder("chat"), Recorder("completion")
    app.state.enable_server_load_tracking = False
    client, answers = TestClient(app), {}
    for kind, (body, _) in STREAM_BODIES.items():
        with client.stream("POST", "/invocations", json=body) as response:
            answers[kind] = {"status": response.status_code, "type": response.headers.get("content-type", ""),
                             "body": b"".join(response.iter_bytes()).decode()}
    return {"seen": seen, "answers": answers}


TASKS["invocations-stream"] = invocations_stream


@builtin("vllm-invocations-stream", "cpu")
def vllm_invocations_stream(claims):
    """SageMaker's /invocations, as vLLM's own router serves it, streams a `"stream": true` chat or completion body
    as server-sent events: the route validates it as the OpenAI request type (stream set), hands it to vLLM's own
    chat or completion endpoint, and that endpoint answers the serving object's generator as text/event-stream,
    event by event. The tokens themselves need a model on a GPU (the serving tier)."""
    found = _on_cpu_platform("invocations-stream")
    def events(kind: str) -> str:
        return "".join(f"data: {json.dumps({'kind': kind, 'n': n})}\n\n" for n in range(3)) + "data: [DONE]\n\n"

    expected = [{"kind": kind, "type": type_name, "stream": True} for kind, (_, type_name) in STREAM_BODIES.items()]
    expect(found["seen"] == expected, f"vLLM's /invocations routed the stream bodies as {found['seen']}, expected "
                                      f"{expected}")
    for kind in STREAM_BODIES:
        answer = found["answers"][kind]
        expect(answer["status"] == 200 and answer["type"].startswith("text/event-stream"),
               f"{kind}: /invocations answered {answer['status']} {answer['type']!r}: {answer['body'][:200]}")
        expect(answer["body"] == events(kind), f"{kind}: the events came back as {answer['body'][:200]!r}")
    return ("POST /invocations with \"stream\": true: a chat body -> ChatCompletionRequest -> create_chat_completion, "
            "a completion body -> CompletionRequest -> create_completion, each answered text/event-stream with the "
            "serving object's events in order")


if __name__ == "__main__":  # `python3 vllm_check.py TASK ARGV...` (TASKS): one task, its result as JSON
    print(MARK + json.dumps(TASKS[sys.argv[1]](*sys.argv[2:])), flush=True)
