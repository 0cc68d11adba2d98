"""The vLLM profile: vLLM's own OpenAI-compatible server under SageMaker's contract, as AWS's SageMaker vLLM
containers ship it (aws/deep-learning-containers docker/vllm): port 8080, `/ping` and `/invocations` served by
vLLM itself, `SM_VLLM_*` settings mapped to `vllm serve` flags by buildkit/resources/image/sm_vllm.py, the model from
/opt/ml/model. No DJL front: that would need DJL's own vLLM handler (djl_python.lmi_vllm), which cannot be
fetched here, and it is the glue that breaks on vLLM's API churn. No Java, no builder stage: vLLM and its
torch are wheels.

Facts: buildkit/data/vllm.yaml (read from the released wheel). Template: templates/profiles/vllm/.
In-image checks: buildkit/resources/check/vllm_check.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import versions
from ..facts import ArchEntry, coverage, sm_name
from ..interface import Ask, Client, ServingWay, Setup, tiny_model_command

NAME = "vllm"
COMPONENTS = ("vllm",)
TITLES = {"vllm": "vLLM"}
LIBRARIES: tuple[str, ...] = ()  # vLLM pins what it needs; a line may add pins with `pip:`
OPTIONS: dict[str, tuple[str, ...]] = {}
OPTION_HELP: dict[str, str] = {}
BASES = ("runtime",)
COMPILES = False  # nothing is compiled: vLLM's kernels come in its wheel
CPU = False
DATA = ("vllm",)
DOCKERFILE = "profiles/vllm/Dockerfile.j2"
TEMPLATES = {"entrypoint.sh": "profiles/vllm/entrypoint.sh.j2"}
EXECUTABLE = frozenset({"entrypoint.sh"})
_RESOURCES = Path(__file__).resolve().parent.parent / "resources"
VERBATIM = {"sm_vllm.py": _RESOURCES / "image" / "sm_vllm.py"}
CHECKER = _RESOURCES / "check" / "vllm_check.py"
LAYERS = ("runtime",)
ALONE: tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    version: str
    python: tuple[str, str]
    torch: str
    torch_variant: str
    cuda_major: str
    sm: tuple[str, ...]
    ptx: tuple[str, ...]
    bf16_min_sm: str
    min_glibc: str
    extra_roots: tuple[str, ...] = ()  # lock roots beside vllm itself (a clash its metadata lets through, the streamer)

    @property
    def archs(self) -> tuple[ArchEntry, ...]:
        ptx = set(self.ptx)
        return tuple(ArchEntry(sm, sm in ptx) for sm in sorted(set(self.sm) | ptx, key=versions.key))


@dataclass(frozen=True)
class Facts:
    releases: dict[str, Release]
    sources: dict[str, str]

    def source(self, key: str) -> str:
        return f"vllm.yaml: {self.sources[key].split(' (')[0][:160]}"



def load_facts(docs: dict[str, dict]) -> Facts:
    doc = docs["vllm"]
    return Facts(
        releases={v: Release(version=v, python=tuple(r["python"]), torch=r["torch"], torch_variant=r["torch_variant"],
                             cuda_major=str(r["cuda_major"]), sm=tuple(r["sm"]), ptx=tuple(r["ptx"]),
                             bf16_min_sm=r["bf16_min_sm"], min_glibc=str(r["lock"]["min_glibc_for_wheels"]),
                             extra_roots=tuple(r["lock"].get("extra_roots") or ()))
                  for v, r in doc["releases"].items()},
        sources={k: " ".join(str(v).split()) for k, v in doc["sources"].items()},
    )


CPU_SOURCE = "vllm.yaml: the wheel's kernels link libcudart.so.13 (source: linked)"


def _rules(ctx) -> None:
    c, e, fam, tk = ctx.combo, ctx.stack, ctx.family, ctx.toolkit
    version = c.part("vllm")
    release = e.releases.get(version)
    if release is None:
        ctx.error("known-version", "vllm", f"unknown vllm '{version}'", e.source("wheel"),
                  " or ".join(versions.nearest(version or "", list(e.releases))))
        return
    if c.torch != release.torch:
        ctx.error("engine-torch", "torch", f"vLLM {version} pins torch=={release.torch}, not {c.torch}",
                  e.source("wheel"), f"torch {release.torch}")
    if not versions.in_range(c.python, release.python):
        lo, hi = release.python
        ctx.error("python-range", "python", f"vLLM {version} requires Python {lo}-{hi}, not {c.python}",
                  e.source("wheel"), f"python {lo}")
    system = ctx.facts.systems.get(c.os)
    if system and versions.key(system.glibc) < versions.key(release.min_glibc):
        ctx.error("engine-glibc", "os", f"{c.os}'s glibc {system.glibc} is older than {release.min_glibc}: part of "
                  f"vLLM {version}'s set has no wheel for it (llguidance resolves to an sdist)", e.source("lock"),
                  "an os with glibc >= " + release.min_glibc)
    if tk is not None and tk.major != release.cuda_major:
        ctx.error("engine-cuda", "cuda", f"vLLM {version}'s kernels link CUDA {release.cuda_major} "
                  f"(libcudart.so.{release.cuda_major}), not CUDA {tk.version}", e.source("linked"),
                  f"cuda {release.cuda_major}.0")
    if fam is None or not fam.is_gpu:
        return
    cov = coverage(release.archs, fam.sm)
    if not cov.covered:
        listed = ";".join(e_.sm + ("+PTX" if e_.ptx else "") for e_ in release.archs)
        ctx.error("arch-in-engine", "vllm", f"vLLM {version}'s kernels are built for {listed}, which has no "
                  f"code for {fam.name}'s {fam.gpu} ({sm_name(fam.sm)})", e.source("kernels"),
                  f"excluding {fam.name} from this line")
        return
    if versions.key(fam.sm) < versions.key(release.bf16_min_sm):
        ctx.verdict.notes.append(f"vLLM on {sm_name(fam.sm)}: no bfloat16 (below {sm_name(release.bf16_min_sm)}; "
                                 "serve with SM_VLLM_DTYPE=half) and no FlashAttention kernels")


RULES = (_rules,)


@dataclass(frozen=True)
class Spec:
    """What a vLLM image needs beyond the core spec (templates read it as spec.stack)."""

    vllm: str
    extra_roots: tuple[str, ...] = ()  # further lock roots the facts name for this release (vllm.yaml lock)
    name: str = NAME

    @property
    def versions(self) -> dict[str, str]:
        return {"vllm": self.vllm}

    @property
    def bases(self) -> tuple[str, ...]:
        return ()


def stack_spec(image, facts, stack: Facts, verdict, toolkit, system) -> Spec:
    version = image.combo.part("vllm")
    return Spec(vllm=version, extra_roots=stack.releases[version].extra_roots)


def tag(spec) -> str:
    return f"vllm{spec.stack.vllm}"


def aliases(spec, family: str) -> tuple[str, ...]:
    return (f"vllm{versions.minor(spec.stack.vllm)}-{family}", f"vllm-{family}-latest")


def newness(spec) -> tuple:
    return (versions.key(spec.stack.vllm),)


def labels(spec) -> dict[str, str]:
    return {"vllm": spec.stack.vllm}


def description(spec) -> str:
    return f"vLLM {spec.stack.vllm} (its OpenAI-compatible server on SageMaker's /ping and /invocations)"


def claims(spec) -> tuple[dict[str, str], dict]:
    return {"vllm": spec.stack.vllm}, {}


def lock_layers(spec) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (("runtime", (f"vllm=={spec.stack.vllm}", *spec.stack.extra_roots,
                         *(f"{n}=={v}" for n, v in sorted(spec.libraries.items())), *spec.pip)),)


def lock_problem(spec) -> str | None:
    return None


# --- publishing (warnings, the index, the SBOM, `lmi facts verify`) --------------------------------------
# What publishing asks of the vLLM profile (the protocol: buildkit/profiles/__init__.py).

INDEX_LEGACY: dict[str, str] = {}  # no index was written before this profile existed
DEB_ROLES: dict[str, str] = {}
SBOM_FILES: tuple[str, ...] = ()


def warnings(specs) -> list[str]:
    return []  # everything a vLLM image installs is locked with hashes


def sbom_properties(name: str, files: list[str], claims: dict) -> list[tuple[str, str]]:
    return [("lmi:role", "vllm")] if name == "vllm" else []


def index_versions(stack) -> dict[str, tuple[list[str], str]]:
    return {"vllm": (list(stack.releases), "buildkit/data/vllm.yaml")}


# --- `lmi test` (builtins per tier, the serving files, environment and ways) -----------------------------
# What `lmi test` checks in a vLLM image (buildkit/smoke.py asks the profile): its builtins per tier (core ones from
# buildkit/resources/check/lmi_check.py, its own from vllm_check.py beside it), the entry point that maps SM_VLLM_* to
# `vllm serve`, the environment its image sets, and how it serves: vLLM's own server under SageMaker's contract (port
# 8080, GET /ping, POST /invocations routed by the body's shape: an OpenAI chat body and a completion body). vLLM's
# kernels need a GPU (its wheel links libcudart.so.13; buildkit/data/vllm.yaml, source `linked`): the serving tier runs
# where one is usable and is skipped, with the reason, elsewhere. The cpu tier runs anywhere.

CHECKS = {
    "cpu": ("python-version", "torch-version", "torch-cuda", "vllm-version", "pip-check", "installed-files-distinct",
            "vllm-import", "vllm-routes", "sm-vllm-mapping", "vllm-serve-help", "cuda-compat-files", "runai-streamer",
            "vllm-invocations-stream"),
    "gpu": ("nvidia-smi", "cuda-available", "compute-capability", "arch-list", "bf16", "vllm-kernels",
            "nccl-allreduce", "cuda-compat-active"),
}


def checks(spec) -> dict[str, tuple[str, ...]]:
    """The builtins of a vLLM image, per tier (the same for every image: all of them are GPU images)."""
    return CHECKS


# The image's own mapping of SM_VLLM_* to `vllm serve` flags (buildkit/resources/image/sm_vllm.py, a verbatim
# file of the profile).
SERVING_FILES = (("serving-config", {"path": "/opt/lmi/python/sm_vllm.py", "contains": r"SM_VLLM_"}),)
# An endpoint sends nothing to vLLM's authors (vllm/usage/usage_lib.py reads both).
SERVING_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

PROMPT, MAX_TOKENS, MODEL_NAME = "the lmi smoke test", 8, "tiny"
# The tiny model has no chat template of its own: the chat body's messages, concatenated (one argv token).
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def setup(spec, gpu: bool, gpus: int) -> Setup:
    """Configured only by SM_VLLM_* as on SageMaker; the model from /opt/ml/model (sm_vllm's default). Small:
    a 128-token context, a third of the GPU's memory, no CUDA graphs (a quick start), float16 (every SM vLLM
    serves has it; bfloat16 needs sm_80)."""
    return Setup(ranks=1, env={
        "SM_VLLM_SERVED_MODEL_NAME": MODEL_NAME, "SM_VLLM_MAX_MODEL_LEN": "128",
        "SM_VLLM_GPU_MEMORY_UTILIZATION": "0.3", "SM_VLLM_DTYPE": "float16", "SM_VLLM_ENFORCE_EAGER": "true",
        "SM_VLLM_CHAT_TEMPLATE": CHAT_TEMPLATE, "HF_HUB_OFFLINE": "1"})


def _answer(client: Client, body: dict, what: str) -> tuple[dict | None, str]:
    status, text = client.post(body)
    try:
        answer = json.loads(text)
    except ValueError:
        return None, f"{what} on POST /invocations: HTTP {status}: {text[-300:]!r}"
    if status != "200":
        return None, f"{what} on POST /invocations: HTTP {status}: {answer!r}"[:400]
    return answer, ""


def _tokens(answer: dict) -> int:
    return int((answer.get("usage") or {}).get("completion_tokens") or 0)


def ask_chat(client: Client, reference: list, ranks: int) -> tuple[bool, str]:
    """An OpenAI chat body: a chat.completion with an assistant message of 1..MAX_TOKENS tokens."""
    answer, problem = _answer(client, {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}],
                                       "max_tokens": MAX_TOKENS, "temperature": 0}, "a chat body")
    if answer is None:
        return False, problem
    try:
        message = answer["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return False, f"a chat body on POST /invocations: no choices[0].message in {answer!r}"[:400]
    ok = (answer.get("object") == "chat.completion" and message.get("role") == "assistant"
          and isinstance(message.get("content"), str) and 1 <= _tokens(answer) <= MAX_TOKENS)
    return ok, (f"a chat body on POST /invocations: {_tokens(answer)} token(s), {message.get('content')!r}" if ok else
                f"a chat body on POST /invocations: not a chat completion of 1-{MAX_TOKENS} tokens: {answer!r}"[:400])


def ask_completion(client: Client, reference: list, ranks: int) -> tuple[bool, str]:
    """A completion body: a text_completion of 1..MAX_TOKENS tokens (greedy; plain Transformers' float32
    continuation is reported beside it, not required: the server computes in float16)."""
    answer, problem = _answer(client, {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                       "temperature": 0}, "a completion body")
    if answer is None:
        return False, problem
    try:
        text = answer["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        return False, f"a completion body on POST /invocations: no choices[0].text in {answer!r}"[:400]
    ok = answer.get("object") == "text_completion" and isinstance(text, str) and 1 <= _tokens(answer) <= MAX_TOKENS
    return ok, (f"a completion body on POST /invocations: {_tokens(answer)} token(s), {text!r} (plain Transformers "
                f"in float32: {reference[0]!r})" if ok else
                f"a completion body on POST /invocations: not a completion of 1-{MAX_TOKENS} tokens: {answer!r}"[:400])


SERVING_WAYS = (
    # One head of 64: the tiny model's default 8 heads are 8 wide, and vLLM's FlashAttention backend has listed
    # head sizes from 32 up (get_supported_head_sizes, vllm/attention/backends/flash_attn.py in the releases
    # read; 0.33.0's list not read here). 64 is in every list.
    ServingWay("vllm", tuple(tiny_model_command(PROMPT, MAX_TOKENS, heads=1)), setup,
               (Ask("serving-chat", ask_chat), Ask("serving-completion", ask_completion)),
               ping="serving-ping", needs_gpu=True),
)
