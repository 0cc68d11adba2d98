"""lmi_deepspeed: the toolkit's handler for DJL Serving's Python engine, and its DeepSpeed way.

Copied verbatim into every image (at /opt/lmi/python, on the Python path of DJL's workers). DJL Serving
dropped its own DeepSpeed handler in 0.28.0; on those versions this is the default entry point
(`OPTION_ENTRYPOINT=lmi_deepspeed`), and on 0.27 it can be chosen with `option.entryPoint=lmi_deepspeed`
(with `engine=Python` or `engine=MPI`: without an engine line DJL 0.27 turns rolling batch on).

Three ways to serve, chosen in serving.properties, each a service class `Service(props, cuda)` with
`.load()` and `.answer(requests)` (one answer per Request: a JSON-able object, a Reply, or a RequestError):
    option.partition=deepspeed (default)  this module: DeepSpeed tensor parallelism over the ranks DJL started
    option.partition=accelerate           lmi_accelerate: one process, Accelerate's device map
    a model directory with model_index.json  lmi_diffusion: a Diffusers pipeline
The glue (`handle`) is the same for all three: see `Ranks` for how requests reach every rank.

How DJL runs it (facts in buildkit/data/djl.yaml, each with its DJL source; docs/djl.md): in MPI mode
(`option.mpi_mode=true`, only with GPUs: DJL refuses MPI mode on a machine without one) DJL starts
`mpirun -np <tensor_parallel_degree>` workers with MASTER_ADDR and MASTER_PORT set, and sends the model load to
every rank. Requests then go to rank 0 only ("passive workers", DJL >= 0.30 by default), or to every rank with
the LAST rank's answer returned (older DJL, or option.use_passive_workers=false). This handler is correct in
both: rank 0 broadcasts each batch to the other ranks, every rank generates, and every rank that DJL asks
answers what its own generation gave (the same on every rank). Without MPI, DJL runs one process: one rank.
The DeepSpeed way loads a Transformers causal LM from a local directory and hands it to
`deepspeed.init_inference`, which partitions its weights across the ranks (tensor parallelism): kernel
injection where DeepSpeed has a policy for the architecture and the GPU's SM allows it, AutoTP otherwise
(and always on CPU, where ranks talk over gloo), with an explicit tensor-slicing policy for GPT-2, which
AutoTP declines. One rank without kernel injection has nothing to partition: the model is served as loaded
(cast to the dtype, on the rank's device), and DeepSpeed is not imported.

serving.properties options of the DeepSpeed way (DJL passes them without the `option.` prefix):
    option.model_id                 a local model directory (default: the model directory, /opt/ml/model), a
                                    Hugging Face Hub id (org/name, downloaded once per host by lmi_source), or
                                    an s3:// URL that DJL downloads before the handler (docs/deployment.md)
    option.tensor_parallel_degree   ranks to partition over; must equal the ranks DJL started
    option.dtype                    fp16 | bf16 | fp32 (default: fp16 on GPU, fp32 on CPU)
    option.max_new_tokens           default and upper bound of a request's max_new_tokens (default 256)
    option.kernel_injection         auto | true | false (default auto)
    option.trust_remote_code        false (a model's own code is never run)
    option.allow_model_code         false: a model directory holding Python that would shadow the handler's
                                    imports, or a model.py DJL imports, is refused (true: served anyway)
    option.enable_streaming         true | false (default): answer as a jsonlines token stream (lmi_stream)
Bounds, each checked on rank 0 before any work (a request over one is a 400 naming the option):
    option.max_prompt_tokens        tokens of a prompt; prompt + max_new_tokens <= the model's positions
                                    (default: the positions, max_position_embeddings or the like)
    option.max_prompt_chars         characters of a prompt (default 32 x the positions)
    option.max_prompts              prompts per request (default 16)
    option.max_batch_tokens         padded tokens (prompt + new) of one generate call; larger batches are split
                                    and a request over it alone is refused (default 8 x the positions)
    option.max_body_bytes           bytes of a body (default: what max_prompts x max_prompt_chars can need)
    option.max_body_depth           nesting of a JSON body (default 16)
    option.max_batch_size           requests in a DJL batch (default 999, DJL's own limit; DJL does not pass
                                    its batch_size to the handler); an Input claiming more is refused, and a
                                    batch_size header without DJL's batch keys is one request
Requests, in the LMI shape: {"inputs": "text" | ["text", ...], "parameters": {...}} -> {"generated_text":
"..."} or a list of them; a text/* body is the prompt itself; the body is DJL's "data" entry that came from the
HTTP body (never a query parameter of the same name). Parameters: max_new_tokens, do_sample,
temperature, top_k, top_p, repetition_penalty, seed, return_full_text. A bad request is answered 400 with a
message (in a DJL batch every request shares the batch's HTTP status, so a bad request's own answer is its JSON
{"error", "code": 400}); only a failure of the model itself is a 424. A bad option fails the model load with
one line naming it (DJL logs "Failed to initialize model: <that line>").

Importing this module costs nothing: torch, Transformers and DeepSpeed load with the model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import traceback
from dataclasses import dataclass

log = logging.getLogger("lmi_deepspeed")

DEFAULT_MODEL_DIR = "/opt/ml/model"
DTYPES = ("fp16", "bf16", "fp32")
DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
# Architectures DeepSpeed's v1 kernel injection has a policy for (deepspeed/module_inject/replace_policy.py;
# the same set from 0.12 to 0.19). Others are partitioned with AutoTP.
KERNEL_INJECTION_MODELS = frozenset({"bert", "bloom", "distilbert", "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama",
                                     "megatron-bert", "opt"})
MAX_SEED = 2**63 - 1  # torch.manual_seed refuses larger seeds
# A JSON string (escapes included) or a bracket: the tokens that decide a body's nesting depth.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
PARAMETERS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
              "return_full_text"}
# DJL's own properties, passed beside the model's options; not ours to check.
DJL_PROPERTIES = {"engine", "entryPoint", "mpi_mode", "model_dir", "device_id", "pipeline_parallel_degree",
                  "cluster_size", "output_formatter", "input_formatter", "job_queue_size", "batch_size",
                  "max_batch_delay", "max_idle_time", "log_request_metric", "predict_timeout", "parallel_loading",
                  "use_passive_workers", "rolling_batch", "async_mode", "partition"}
WAYS = ("deepspeed", "accelerate")  # option.partition; a diffusion pipeline is recognised by its model_index.json


class OptionError(ValueError):
    """A serving.properties option is wrong: the model does not load."""


class RequestError(ValueError):
    """A request is wrong: it is answered with a 4xx status, the model stays up."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # broadcast from rank 0 with its code
        return type(self), (str(self), self.code)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message as one line (its first, at most `limit` characters), for an answer or a log."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def model_error(exc: BaseException) -> RequestError:
    """A failure of the model itself while answering: a 424 for the requests it was answering, one line."""
    return RequestError(f"the model failed: {type(exc).__name__}: {first_line(exc, 300)}", 424)


def input_error(exc: BaseException) -> RequestError:
    """A request that failed in a way no check foresaw (e.g. the tokenizer raising on it): still its own 400,
    one line."""
    return RequestError(f"the request could not be read: {type(exc).__name__}: {first_line(exc, 300)}")


def loads_bounded(data: bytes, max_depth: int, max_bytes: int):
    """A JSON body -> its value, or RequestError(400): over max_bytes, not UTF-8, nested deeper than
    max_depth (counted before parsing, so json.loads never recurses deeper), not JSON, or a string holding a
    lone surrogate. The same on any thread, whatever its stack."""
    text = body_text(data, max_bytes)
    depth = 0
    for token in _JSON_TOKENS.finditer(text):
        c = token.group()
        if c in "[{":
            depth += 1
            if depth > max_depth:
                raise RequestError(f"the body is nested deeper than option.max_body_depth={max_depth}")
        elif c in "]}":
            depth -= 1
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError("the body is not JSON") from None
    _no_surrogates(value)
    return value


def body_text(data: bytes, max_bytes: int) -> str:
    """A body as UTF-8 text, or RequestError: 413 over max_bytes (checked before decoding), 400 not UTF-8."""
    if len(data) > max_bytes:
        raise RequestError(f"the body is {len(data)} bytes, over option.max_body_bytes={max_bytes}", 413)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("the body is not UTF-8 text") from None


def _no_surrogates(value) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("the body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is no "
                                   "character; send valid Unicode") from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


@dataclass(frozen=True)
class Request:
    """One request of a batch as DJL hands it over: the body's bytes, its media type (lower case, no
    parameters; "" when absent) and the client's Accept header ("" when absent)."""

    body: bytes
    content_type: str = ""
    accept: str = ""

    def json(self, max_depth: int = 16, max_bytes: int = 1 << 20):
        """The body as JSON (bounded: see loads_bounded), or RequestError."""
        return loads_bounded(self.body, max_depth, max_bytes)

    def text(self, max_bytes: int = 1 << 20) -> str:
        """The body as UTF-8 text (bounded: see body_text), or RequestError."""
        return body_text(self.body, max_bytes)

    def lmi(self, max_depth: int = 16, max_bytes: int = 1 << 20):
        """The body in the LMI shape: a text/* body is the prompt ({"inputs": text}), anything else JSON."""
        if self.content_type in FORM_TYPES:
            raise RequestError(f"cannot read Content-Type {self.content_type}; send application/json or "
                               "text/plain", 415)
        if self.content_type.startswith("text/"):
            return {"inputs": self.text(max_bytes)}
        return self.json(max_depth, max_bytes)


@dataclass(frozen=True)
class Reply:
    """An answer that is not JSON (e.g. a PNG): its bytes and its media type."""

    body: bytes
    content_type: str


@dataclass(frozen=True)
class Options:
    model_dir: str
    tensor_parallel_degree: int
    dtype: str
    max_new_tokens: int
    kernel_injection: str  # auto | true | false
    limits: dict = None  # bound options given in serving.properties ({} where derived from the model)


LIMIT_OPTIONS = ("max_prompt_tokens", "max_prompt_chars", "max_prompts", "max_batch_tokens", "max_body_bytes",
                 "max_body_depth", "max_batch_size")


@dataclass(frozen=True)
class Limits:
    """The bounds a request is checked against before any work; see the module's docstring."""

    positions: int  # the model's positions: prompt + new tokens must fit
    max_prompt_tokens: int
    max_prompt_chars: int
    max_prompts: int
    max_batch_tokens: int
    max_body_bytes: int
    max_body_depth: int
    max_new_tokens: int


def model_positions(config, tokenizer=None) -> int:
    """How many positions (prompt + generated tokens) the model takes, from its config; a tokenizer's
    model_max_length where the config names none."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1 << 24 else 2048


def make_limits(options: Options, positions: int) -> Limits:
    """The bounds for a model of `positions` positions: options where given, else derived from it."""
    given = options.limits or {}
    max_new = options.max_new_tokens
    if max_new >= positions:
        if "max_new_tokens" in given:
            raise OptionError(f"option.max_new_tokens={max_new}: the model has {positions} positions for prompt "
                              "and new tokens together; set it lower")
        max_new = max(1, positions // 2)  # the default, on a model with few positions
    prompt_tokens = given.get("max_prompt_tokens", positions - 1)
    if prompt_tokens >= positions:
        raise OptionError(f"option.max_prompt_tokens={prompt_tokens}: the model has {positions} positions")
    chars = given.get("max_prompt_chars", 32 * positions)
    prompts = given.get("max_prompts", 16)
    return Limits(positions=positions, max_prompt_tokens=prompt_tokens, max_prompt_chars=chars,
                  max_prompts=prompts, max_batch_tokens=given.get("max_batch_tokens", 8 * positions),
                  max_body_bytes=given.get("max_body_bytes", 6 * chars * prompts + 65536),
                  max_body_depth=given.get("max_body_depth", 16), max_new_tokens=max_new)


def parse_limit_options(props: dict) -> dict:
    """The bound options serving.properties gives (whole numbers >= 1), or OptionError."""
    return {key: _int(props, key, 1) for key in (*LIMIT_OPTIONS, "max_new_tokens") if key in props}


def _int(props: dict, key: str, default: int, low: int = 1) -> int:
    raw = props.get(key, default)
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise OptionError(f"option.{key}={raw!r}: not a whole number") from None
    if value < low:
        raise OptionError(f"option.{key}={value}: must be at least {low}")
    return value


def load_tokenizer(model_dir: str):
    """A causal LM's tokenizer, padding on the left (decoder-only models continue from the right)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def parse_dtype(props: dict, cuda: bool) -> str:
    """option.dtype -> fp16 | bf16 | fp32 (default: fp16 on GPU, fp32 on CPU), or OptionError."""
    dtype = str(props.get("dtype", "fp16" if cuda else "fp32")).strip().lower()
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise OptionError(f"option.dtype={props.get('dtype')!r}: use one of {', '.join(DTYPES)}")
    if not cuda and dtype == "fp16":
        raise OptionError("option.dtype=fp16: half precision needs a GPU; use fp32 or bf16 on CPU")
    return dtype


def parse_kernel_injection(props: dict) -> str:
    """option.kernel_injection -> auto | true | false, or OptionError."""
    inject = str(props.get("kernel_injection", "auto")).strip().lower()
    if inject not in ("auto", "true", "false"):
        raise OptionError(f"option.kernel_injection={inject!r}: use auto, true or false")
    return inject


def parse_options(props: dict, world_size: int, cuda: bool) -> Options:
    """serving.properties -> Options, or OptionError naming the option that is wrong."""
    model_dir = str(props.get("model_id") or props.get("model_dir") or DEFAULT_MODEL_DIR).strip()
    if "://" in model_dir or not os.path.isdir(model_dir):
        raise OptionError(f"option.model_id={model_dir!r}: not a local directory; this image loads models from "
                          f"{DEFAULT_MODEL_DIR}, a local path, a hub id (org/name) or an s3:// URL DJL downloads")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise OptionError(f"option.model_id={model_dir!r}: no config.json there; give a Transformers model directory")
    tp = _int(props, "tensor_parallel_degree", world_size)
    if tp != world_size:
        how = ("set option.mpi_mode=true so DJL starts one rank per partition (DJL runs MPI mode only where "
               "GPUs are), or tensor_parallel_degree=1" if world_size == 1 else
               "DJL starts tensor_parallel_degree x pipeline_parallel_degree ranks, and this handler partitions "
               "over all of them: remove option.pipeline_parallel_degree")
        raise OptionError(f"option.tensor_parallel_degree={tp}, but {world_size} rank(s) were started; {how}")
    dtype, inject = parse_dtype(props, cuda), parse_kernel_injection(props)
    if str(props.get("trust_remote_code", "false")).strip().lower() not in ("false", "0", ""):
        raise OptionError("option.trust_remote_code: this handler never runs a model's own code; remove the option")
    return Options(model_dir=model_dir, tensor_parallel_degree=tp, dtype=dtype,
                   max_new_tokens=_int(props, "max_new_tokens", 256), kernel_injection=inject,
                   limits=parse_limit_options(props))


def parse_request(body, max_new_tokens: int, max_prompts: int = 16,
                  max_prompt_chars: int = 1 << 20) -> tuple[list[str], dict, bool]:
    """An LMI request -> (prompts, generation parameters, whether the answer is a list), checked against the
    bounds that need no tokenizer; RequestError(400) otherwise."""
    if not isinstance(body, dict):
        raise RequestError('the body must be a JSON object: {"inputs": "...", "parameters": {...}}')
    unknown = sorted(set(body) - {"inputs", "parameters"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)[:200]}: a request has 'inputs' and 'parameters'")
    inputs = body.get("inputs")
    is_list = isinstance(inputs, list)
    prompts = inputs if is_list else [inputs]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError("'inputs' must be a non-empty string or a non-empty list of non-empty strings")
    if len(prompts) > max_prompts:
        raise RequestError(f"{len(prompts)} prompts, over option.max_prompts={max_prompts}")
    longest = max(len(p) for p in prompts)
    if longest > max_prompt_chars:
        raise RequestError(f"a prompt of {longest} characters, over option.max_prompt_chars={max_prompt_chars}")
    params = body.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be a JSON object")
    unknown = sorted(set(params) - PARAMETERS)
    if unknown:
        raise RequestError(f"unknown parameter(s) {', '.join(unknown)[:200]}; known: {', '.join(sorted(PARAMETERS))}")
    out = {"max_new_tokens": params.get("max_new_tokens", min(max_new_tokens, 32))}
    n = out["max_new_tokens"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_new_tokens:
        raise RequestError(f"max_new_tokens must be a whole number from 1 to {max_new_tokens} "
                           "(option.max_new_tokens)")
    for key in ("do_sample", "return_full_text"):
        if key in params and not isinstance(params[key], bool):
            raise RequestError(f"{key} must be true or false")
    for key, low, high in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0), ("repetition_penalty", 0.0, 100.0)):
        if key in params:
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise RequestError(f"{key} must be a number in ({low:g}, {high:g}]")
            out[key] = float(value)  # Transformers wants floats: a JSON 1 is 1.0
    if "top_k" in params:
        value = params["top_k"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 20:
            raise RequestError("top_k must be a whole number from 0 to 1048576")
        out["top_k"] = value
    if "seed" in params:
        value = params["seed"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
            raise RequestError(f"seed must be a whole number from 0 to {MAX_SEED}")
        out["seed"] = value
    out.update({k: params[k] for k in ("do_sample", "return_full_text") if k in params})
    return prompts, out, is_list


@dataclass(frozen=True)
class Job:
    """One request checked on rank 0, as every rank runs it: its prompts' token ids (no parsing left to do),
    its generation parameters (a sampling request carries the seed rank 0 chose), whether it answers a list."""

    prompts: tuple
    ids: tuple  # one tuple of token ids per prompt
    params: dict
    is_list: bool


def _rank_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as DJL's MPI mode (mpirun) or torch's launchers set them."""
    env = os.environ
    rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", env.get("RANK", "0"))))
    world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", env.get("WORLD_SIZE", "1"))))
    local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("LOCAL_RANK", str(rank))))
    return rank, world, local


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ranks(cuda: bool) -> tuple[int, int]:
    """Join the ranks into one process group. DJL's MPI mode sets MASTER_ADDR and MASTER_PORT (Connection.java);
    under a bare mpirun without MASTER_PORT, rank 0 picks a free port and tells the others over MPI."""
    rank, world, local = _rank_environment()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    if world == 1:
        return rank, world
    # DeepSpeed's CPU all-reduce (shm_comm) is only set up when LOCAL_SIZE says how many ranks share the
    # machine, as its own launcher sets it; without it 0.18.9's inference all-reduce crashes.
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", str(world)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
            raise OptionError("several ranks but no MASTER_PORT and no MPI launcher; set option.mpi_mode=true")
        from mpi4py import MPI

        os.environ["MASTER_PORT"] = str(MPI.COMM_WORLD.bcast(_free_port() if rank == 0 else None, root=0))
    import deepspeed
    import torch

    if cuda:
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    return rank, world


def _gpt2_tensor_slicing(model, tp: int) -> dict:
    """GPT-2 made sliceable by DeepSpeed's generic tensor slicing, and the injection policy that slices it.

    AutoTP declines GPT-2 ("use kernel injection since container policy for model exists"), and DeepSpeed's own
    Conv1D slicing fails on it (0.18.9: split sizes of the transposed weight). So each block's Conv1D layers
    become the nn.Linear layers they are (y = x W + b, W transposed: the same numbers), the fused q|k|v rows of
    c_attn are reordered rank by rank (q_r|k_r|v_r for the heads of rank r), so that the contiguous column slice
    DeepSpeed gives each rank holds its own heads, and the blocks get a class of their own so that AutoTP
    treats them as Linear layers. attn.c_proj and mlp.c_proj are the row-parallel (all-reduce) layers."""
    import torch
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = model.config
    if config.n_head % tp:
        raise OptionError(f"option.tensor_parallel_degree={tp}: GPT-2's {config.n_head} attention heads do not "
                          "divide evenly over the ranks")
    block_class = type("LmiSlicedGPT2Block", (GPT2Block,), {})
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            conv = getattr(parent, name)
            linear = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1], dtype=conv.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(conv.weight.t())
                linear.bias.copy_(conv.bias)
            setattr(parent, name, linear)
        embed, share = block.attn.embed_dim, block.attn.embed_dim // tp
        order = torch.cat([torch.arange(part * embed + r * share, part * embed + (r + 1) * share)
                           for r in range(tp) for part in range(3)])
        qkv = block.attn.c_attn
        with torch.no_grad():
            qkv.weight.copy_(qkv.weight[order])
            qkv.bias.copy_(qkv.bias[order])
        block.__class__ = block_class
    return {block_class: ("attn.c_proj", "mlp.c_proj")}


def _gpt2_after_slicing(model) -> None:
    """Each rank's attention splits its c_attn output into its own q, k and v."""
    for block in model.transformer.h:
        block.attn.split_size = block.attn.c_attn.weight.shape[0] // 3


@dataclass(frozen=True)
class _Unpartitioned:
    """A whole model on one rank, where DeepSpeed's InferenceEngine would hold it (`.module`)."""

    module: object


class Service:
    """The DeepSpeed way: one rank's part of a causal LM, loaded once, answering batches in step with the other
    ranks (which `Ranks` keeps in step)."""

    def __init__(self, props: dict, cuda: bool) -> None:
        self.options = parse_options(props, _rank_environment()[1], cuda)
        self.cuda = cuda
        self.engine = self.tokenizer = None
        self.limits: Limits | None = None
        self.injected = False

    def load(self) -> Service:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        o = self.options
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[o.dtype]
        config = AutoConfig.from_pretrained(o.model_dir, trust_remote_code=False)
        self.injected = self._inject(config.model_type, dtype)
        tokenizer = load_tokenizer(o.model_dir)
        model = AutoModelForCausalLM.from_pretrained(o.model_dir, torch_dtype=dtype, trust_remote_code=False,
                                                     low_cpu_mem_usage=True).eval()
        if not self.injected and o.tensor_parallel_degree == 1:
            # Nothing for DeepSpeed to do: with one rank and no kernel injection, init_inference only casts the
            # model to the dtype and moves it to the rank's device (0.18.9, InferenceEngine.__init__), which is
            # done here without importing DeepSpeed (~6 s of imports on 2 cores: torch._dynamo, _inductor...).
            device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
            self.engine = _Unpartitioned(model.to(device=device, dtype=dtype))
            self.tokenizer = tokenizer
            self.limits = make_limits(o, model_positions(config, tokenizer))
            log.info("lmi_deepspeed: %s (%s) on 1 rank, %s, not partitioned", o.model_dir, config.model_type, o.dtype)
            return self
        import deepspeed

        kwargs = {"dtype": dtype, "replace_with_kernel_inject": self.injected}
        sliced = not self.injected and o.tensor_parallel_degree > 1 and config.model_type == "gpt2"
        if o.tensor_parallel_degree > 1:
            kwargs["tensor_parallel"] = {"tp_size": o.tensor_parallel_degree}
        if sliced:
            kwargs["injection_policy"] = _gpt2_tensor_slicing(model, o.tensor_parallel_degree)
        self.engine = deepspeed.init_inference(model, **kwargs)
        if sliced:
            _gpt2_after_slicing(self.engine.module)
        self.tokenizer = tokenizer
        self.limits = make_limits(o, model_positions(config, tokenizer))
        how = "kernel injection" if self.injected else "tensor slicing policy" if sliced else "AutoTP"
        log.info("lmi_deepspeed: %s (%s) on %d rank(s), %s, %s", o.model_dir, config.model_type,
                 o.tensor_parallel_degree, o.dtype, how)
        return self

    def _inject(self, model_type: str, dtype) -> bool:
        """Kernel injection where DeepSpeed has a policy for the architecture and the GPU can run it."""
        import torch

        choice = self.options.kernel_injection
        if choice == "false":
            return False
        reason = None
        if not self.cuda:
            reason = "DeepSpeed's inference kernels are CUDA kernels; this rank has no GPU"
        elif model_type not in KERNEL_INJECTION_MODELS:
            reason = f"DeepSpeed has no kernel-injection policy for {model_type}"
        elif torch.cuda.get_device_capability() < (6, 0):
            reason = "transformer_inference needs sm_60 or newer"
        elif dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
            reason = "bf16 needs sm_80 or newer"
        if reason and choice == "true":
            raise OptionError(f"option.kernel_injection=true: {reason}")
        return reason is None

    def prepare(self, request: Request) -> Job:
        """Rank 0's decision on one request: parsed, checked against every bound, tokenized; or RequestError.
        Nothing here touches the model, so nothing here needs the other ranks."""
        lim = self.limits
        body = request.lmi(lim.max_body_depth, lim.max_body_bytes)
        prompts, params, is_list = parse_request(body, lim.max_new_tokens, lim.max_prompts, lim.max_prompt_chars)
        ids = tuple(tuple(self.tokenizer(p)["input_ids"]) for p in prompts)
        longest = max(len(i) for i in ids)
        if longest > lim.max_prompt_tokens:
            raise RequestError(f"a prompt of {longest} tokens, over option.max_prompt_tokens={lim.max_prompt_tokens}")
        if longest + params["max_new_tokens"] > lim.positions:
            raise RequestError(f"a prompt of {longest} tokens + max_new_tokens {params['max_new_tokens']} is over "
                               f"the model's {lim.positions} positions; send a shorter prompt or ask fewer tokens")
        if len(ids) * (longest + params["max_new_tokens"]) > lim.max_batch_tokens:
            raise RequestError(f"{len(ids)} prompt(s) x ({longest} + {params['max_new_tokens']}) tokens, over "
                               f"option.max_batch_tokens={lim.max_batch_tokens}")
        if params.get("do_sample") and "seed" not in params:
            params["seed"] = random.randrange(MAX_SEED)  # chosen once, on rank 0: every rank draws the same
        return Job(tuple(prompts), ids, params, is_list)

    def prepare_all(self, requests: list[Request]) -> list:
        """One Job or RequestError per request: whatever a request holds, it refuses only itself."""
        jobs: list = []
        for request in requests:
            try:
                jobs.append(self.prepare(request))
            except RequestError as exc:
                jobs.append(exc)
            except Exception as exc:  # an input no check foresaw (e.g. one the tokenizer fails on): still its own
                log.warning("lmi_deepspeed: a request was refused:\n%s", traceback.format_exc())
                jobs.append(input_error(exc))
        return jobs

    def generate_inputs(self, ids: list, params: dict) -> tuple[dict, dict]:
        """generate()'s arguments for the token id sequences `ids` (padded on the left, together): the batch and
        the generation options, greedy or seeded. Seeds torch's generator for a sampling request: every rank
        samples the same token only if every rank draws the same numbers. The streamed answer (lmi_stream)
        generates from the same arguments, so it is the same text."""
        import torch

        device = self.engine.module.device if hasattr(self.engine.module, "device") else "cpu"
        longest, pad = max(len(i) for i in ids), self.tokenizer.pad_token_id
        batch = {"input_ids": torch.tensor([[pad] * (longest - len(i)) + list(i) for i in ids], device=device),
                 "attention_mask": torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids],
                                                device=device)}
        kwargs = {"max_new_tokens": params["max_new_tokens"], "pad_token_id": pad,
                  "do_sample": params.get("do_sample", False)}
        for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if key in params:
                kwargs[key] = params[key]
        if kwargs["do_sample"]:
            torch.manual_seed(params["seed"])
        return batch, kwargs

    def generate(self, ids: list, params: dict) -> list[str]:
        """Continuations of the token id sequences `ids`, decoded."""
        import torch

        batch, kwargs = self.generate_inputs(ids, params)
        with torch.no_grad():
            out = self.engine.module.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def calls(self, jobs: list) -> list[list[int]]:
        """Which jobs are generated together: greedy jobs with equal parameters, in chunks within
        option.max_batch_tokens; a sampling job alone (its answer must not depend on the batch)."""
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            if isinstance(job, Job):
                key = f"alone-{i}" if job.params.get("do_sample") else json.dumps(job.params, sort_keys=True)
                groups.setdefault(key, []).append(i)
        calls = []
        for members in groups.values():
            chunk: list[int] = []
            for i in members:
                trial = chunk + [i]
                n = sum(len(jobs[j].ids) for j in trial)
                longest = max(len(x) for j in trial for x in jobs[j].ids)
                if chunk and n * (longest + jobs[i].params["max_new_tokens"]) > self.limits.max_batch_tokens:
                    calls.append(chunk)
                    trial = [i]
                chunk = trial
            calls.append(chunk)
        return calls

    def run(self, jobs: list) -> list:
        """One answer per Job (a RequestError passes through), the same generate calls on every rank. A call
        that fails is the model's failure: a 424 for its own requests only."""
        texts: dict[int, list[str]] = {}
        failed: dict[int, RequestError] = {}
        for members in self.calls(jobs):
            ids = [x for i in members for x in jobs[i].ids]
            try:
                generated = iter(self.generate(ids, jobs[members[0]].params))
            except Exception as exc:
                log.error("lmi_deepspeed: generate failed:\n%s", traceback.format_exc())
                failed.update({i: model_error(exc) for i in members})
                continue
            for i in members:
                texts[i] = [next(generated) for _ in jobs[i].ids]
        answers: list = []
        for i, job in enumerate(jobs):
            if not isinstance(job, Job):
                answers.append(job)
            elif i in failed:
                answers.append(failed[i])
            else:
                out = texts[i]
                if job.params.get("return_full_text"):
                    out = [p + t for p, t in zip(job.prompts, out, strict=True)]
                out = [{"generated_text": t} for t in out]
                answers.append(out if job.is_list else out[0])
        return answers

    def answer(self, requests: list[Request]) -> list[dict | list | RequestError]:
        """One answer per request, in order: {"generated_text"} (a list for a list of inputs) or a RequestError
        (400 for the request's own fault, 424 where the model failed)."""
        return self.run(self.prepare_all(requests))


def importable_names() -> set[str]:
    """Every top-level module name the handler's process may import: the standard library's, the installed
    distributions' (torch, transformers, deepspeed, diffusers, accelerate, safetensors, numpy, ... whatever
    the image holds), the handler's own modules and DJL's. Derived from the environment, not a list."""
    import sys
    from importlib import metadata

    names = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    names |= set(metadata.packages_distributions())
    names |= {"lmi_deepspeed", "lmi_accelerate", "lmi_diffusion", "lmi_stream", "lmi_source", "djl_python",
              "model"}
    return names


def model_code(model_dir: str) -> list[str]:
    """The Python in a model directory that would run in the handler's process: DJL puts the directory on
    PYTHONPATH (before site-packages), so a module there named like one the process imports runs instead of
    it; model.py is DJL's own (0.36 imports it at the worker's start for its formatters; every version takes
    it as the entry point when none is set). Modules: NAME.py, NAME.pyc, NAME.*.so, a NAME/ package."""
    found = []
    try:
        entries = sorted(os.listdir(model_dir))
    except OSError:
        return []
    if not any(e.endswith((".py", ".pyc", ".so", ".pyd")) or os.path.isdir(os.path.join(model_dir, e))
               for e in entries):
        return []  # no module at all: the names the process may import (~0.2 s to list) are not needed
    names = importable_names()
    for entry in entries:
        path = os.path.join(model_dir, entry)
        if os.path.isdir(path):
            if any(os.path.isfile(os.path.join(path, f"__init__.{ext}")) for ext in ("py", "pyc")):
                name = entry
            else:
                continue  # a plain directory is a namespace portion: any regular module of its name wins
        elif entry.endswith((".py", ".pyc", ".so", ".pyd")):
            name = entry.split(".", 1)[0]
        else:
            continue
        if name in names:
            found.append(entry)
    return found


def check_model_dir(props: dict) -> None:
    """Refuse a model directory holding Python that would run in this process (model_code), unless
    option.allow_model_code=true."""
    if str(props.get("allow_model_code", "false")).strip().lower() == "true":
        return
    model_dir = str(props.get("model_id") or props.get("model_dir") or DEFAULT_MODEL_DIR).strip()
    dirs = {model_dir, str(props.get("model_dir") or model_dir)}
    found = sorted({os.path.join(d, f) for d in dirs if os.path.isdir(d) for f in model_code(d)})
    if found:
        raise OptionError(f"the model directory holds Python that would run in the server ({', '.join(found)}): "
                          "a module named like one the handler imports shadows it, and DJL imports model.py; "
                          "remove it, or set option.allow_model_code=true to serve it anyway")


def check_routing(props: dict) -> None:
    """Refuse, before anything loads, what DJL would route in a way no service here can answer."""
    rolling = str(props.get("rolling_batch", "disable")).strip().lower()
    if rolling not in ("disable", ""):
        raise OptionError(f"option.rolling_batch={rolling}: DJL would stream tokens through its rolling-batch "
                          "protocol, which this handler does not speak; set option.rolling_batch=disable (DJL 0.27 "
                          "turns it on for a text-generation model when serving.properties has no engine= line: "
                          "add engine=Python)")
    if str(props.get("async_mode", "false")).strip().lower() == "true":
        raise OptionError("option.async_mode=true: this handler answers each batch synchronously; remove it")


def service_class(props: dict) -> tuple[str, type]:
    """The way serving.properties chooses and its service class (imported only when chosen)."""
    import importlib

    model_dir = str(props.get("model_id") or props.get("model_dir") or DEFAULT_MODEL_DIR).strip()
    way = str(props.get("partition", "deepspeed")).strip().lower()
    if way not in WAYS:
        raise OptionError(f"option.partition={way!r}: use {' or '.join(WAYS)}")
    if os.path.isfile(os.path.join(model_dir, "model_index.json")):
        module = "lmi_diffusion"  # a Diffusers pipeline (model_index.json), whatever the partition
    elif way == "accelerate":
        module = "lmi_accelerate"
    else:
        return "deepspeed", Service
    try:
        return module, importlib.import_module(module).Service
    except ImportError as exc:
        raise OptionError(f"{module}: this image cannot serve this model that way ({exc})") from None


def _import(module: str):
    import importlib

    return importlib.import_module(module)


def start(properties: dict) -> Service:
    """Load the model on this rank from DJL's properties (the model's serving.properties)."""
    import torch

    cuda = torch.cuda.is_available()
    check_routing(properties)
    properties = _import("lmi_source").resolve(properties)  # a hub id -> a local directory, for every way
    way, cls = service_class(properties)
    _import("lmi_stream").parse_streaming(properties, way)  # option.enable_streaming, checked before any load
    world = _rank_environment()[1]
    if way == "lmi_accelerate" and world > 1:
        raise OptionError(f"option.partition=accelerate: one process sees every device, but DJL started {world} "
                          "ranks; set option.mpi_mode=false")
    service = cls(properties, cuda)  # options are checked before any rank waits on another
    init_ranks(cuda)
    return service.load()


# --- DJL Serving's Python engine entry point -----------------------------------------------------------


class Ranks:
    """Every rank answers every batch, whichever ranks DJL sends it to.

    After the load DJL >= 0.30 sends each batch to rank 0 only (passive workers); older DJL, or
    use_passive_workers=false, sends it to every rank and returns the last rank's answer. So rank 0
    broadcasts each batch over a gloo group of its own (idle ranks wait there without a timeout that could
    fire between requests, and without spinning), every other rank receives it in a background thread and
    runs the same service call, and a rank that DJL also asks (all-ranks routing) answers with the result of
    that same batch: DJL does not send batch k+1 before every rank answered batch k, so the k-th batch a
    rank is asked for is the k-th one rank 0 broadcast."""

    def __init__(self, service, cuda: bool) -> None:
        self.service = service
        self.rank, self.world, local = _rank_environment()
        self.asked = 0  # batches DJL gave this rank (all-ranks routing)
        # (batches this rank finished, the last one's answers or the exception it raised)
        self.done: tuple[int, list | Exception | None] = (0, None)
        self.changed = threading.Condition()
        self.group = None
        if self.world > 1:
            from datetime import timedelta

            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=timedelta(days=365))
            if self.rank:
                threading.Thread(target=self._follow, args=(cuda, local), name="lmi-follow", daemon=True).start()

    def _broadcast(self, jobs: list | None) -> list:
        """Rank 0's decisions on a batch (a Job or a RequestError per request) to every rank: the other ranks
        never read a request, so no rank can decide differently (a stack depth, a thread, a clock)."""
        import torch.distributed as dist

        box = [jobs]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _follow(self, cuda: bool, local: int) -> None:
        if cuda:
            import torch

            torch.cuda.set_device(local)  # the current device is per thread
        while True:
            try:
                jobs = self._broadcast(None)
            except Exception:
                log.error("lmi_deepspeed: rank %d lost rank 0:\n%s", self.rank, traceback.format_exc())
                os._exit(1)  # a rank out of step would hang the others: mpirun ends them all
            try:
                answers = self.service.run(jobs)
            except Exception as exc:  # rank 0 raised the same on the same jobs: DJL answers it 424
                answers = exc
            with self.changed:
                self.done = (self.done[0] + 1, answers)
                self.changed.notify_all()

    def answer(self, requests: list[Request]) -> list:
        if self.world == 1:
            return self.service.answer(requests)
        if self.rank == 0:
            return self.service.run(self._broadcast(self.service.prepare_all(requests)))
        self.asked += 1
        with self.changed:
            self.changed.wait_for(lambda: self.done[0] >= self.asked)
            answers = self.done[1]
        if isinstance(answers, Exception):
            raise answers
        return answers


_ranks: Ranks | None = None
_load_error: str | None = None
_streaming = None  # lmi_stream.Streaming when option.enable_streaming=true


_BATCH_KEY = re.compile(r"batch_(\d{3,})\.")
# DJL's batch prefixes have three digits (PyPredictor.batchPredict: "max 999 batch size"), and DJL passes the
# handler only option.* keys (ModelInfo), not batch_size: option.max_batch_size bounds it lower.
MAX_BATCH_SIZE = 999
_max_batch_size = MAX_BATCH_SIZE  # set at the load from option.max_batch_size


def _batch_size(inputs) -> int:
    """How many requests `inputs` holds as DJL's batch: a batch_size property AND every content key under a
    batch_NNN. prefix within it (PyPredictor.batchPredict). A batch_size header alone (DJL makes headers
    properties) is one request; a batch over option.max_batch_size cannot come from DJL and is refused."""
    raw = inputs.get_properties().get("batch_size")
    keys = inputs.get_content().get_keys()
    if raw is None or not keys or not all(isinstance(k, str) and _BATCH_KEY.match(k) for k in keys):
        return 0
    try:
        size = int(str(raw).strip())
    except ValueError:
        return 0
    if not 1 <= size <= _max_batch_size:
        raise RequestError(f"a batch of {size} requests, over option.max_batch_size={_max_batch_size}")
    if any(int(_BATCH_KEY.match(k).group(1)) >= size for k in keys):
        return 0
    return size


def _body(content) -> bytes:
    """The HTTP body: DJL adds the query parameters to the Input first and the body last, as "data"
    (RequestParser.parseRequest), so a query parameter named data comes first; the body is the last one."""
    body = None
    for key, value in zip(content.get_keys(), content.get_values(), strict=True):
        if key == "data":
            body = value
    return bytes(body or b"")


def _request(item) -> Request:
    content_type = (item.get_property("content-type") or "").split(";")[0].strip().lower()
    return Request(_body(item.get_content()), content_type, item.get_property("accept") or "")


def _decode(inputs) -> list[Request]:
    """DJL's Input -> one Request per request of the batch (a single request unless _batch_size says it is
    DJL's batch): the body is the HTTP body's "data" entry, the media type and Accept its headers."""
    if not _batch_size(inputs):
        return [_request(inputs)]
    return [_request(item) for item in inputs.get_batches()]


def _encode(answer) -> tuple[bytes, str]:
    if isinstance(answer, BaseException):  # a RequestError, as DJL's own handlers answer one within a batch
        return json.dumps({"error": str(answer), "code": getattr(answer, "code", 400)}).encode(), "application/json"
    if hasattr(answer, "body") and hasattr(answer, "content_type"):  # a Reply
        return bytes(answer.body), answer.content_type
    return json.dumps(answer).encode(), "application/json"


def _output(inputs, answers: list):
    """The answers as DJL's Output. One request: its status, body and content type. A batch: one content entry
    per request under its batch index (DJL splits them by `batch_<i>.`); DJL gives every request of a batch the
    same status and properties, so a request's error is its JSON body, and the content type is set only when
    every answer has the same one."""
    from djl_python.outputs import Output

    if len(answers) == 1 and not _batch_size(inputs):
        answer = answers[0]
        if isinstance(answer, BaseException):
            code = getattr(answer, "code", 400)
            return Output().error(str(answer), code=code, message="bad request" if code < 424 else
                                  "invoke handler failure")
        body, content_type = _encode(answer)
        return Output().add(body, key="data").add_property("content-type", content_type)
    outputs = Output()
    types = set()
    for i, answer in enumerate(answers):
        body, content_type = _encode(answer)
        types.add(content_type)
        outputs.add(body, key="data", batch_index=i)
    if len(types) == 1:
        outputs.add_property("content-type", types.pop())
    return outputs


def handle(inputs):
    """DJL's entry point: the first call (empty, on every rank) loads the model; later calls carry a batch.
    A failed load answers an error whose message is the one-line reason: DJL fails the model load with
    "Failed to initialize model: <reason>" (a raised exception would show only "invoke handler failure")."""
    from djl_python.outputs import Output

    global _ranks, _load_error, _max_batch_size, _streaming
    if _ranks is None and _load_error is None:
        try:
            props = inputs.get_properties()
            check_model_dir(props)  # before the first import a model directory could shadow
            _max_batch_size = _int(props, "max_batch_size", MAX_BATCH_SIZE)
            import torch

            service = start(props)
            _ranks = Ranks(service, torch.cuda.is_available())
            _streaming = _import("lmi_stream").attach(_ranks, props)
        except OptionError as exc:
            _load_error = f"lmi_deepspeed: {exc}"
        except Exception as exc:  # the reason in one line; the traceback in the worker's log
            log.error("lmi_deepspeed: the model did not load:\n%s", traceback.format_exc())
            _load_error = f"lmi_deepspeed: {type(exc).__name__}: {first_line(exc)}"
    if _load_error is not None:
        return Output().error(_load_error, code=500, message=_load_error)
    if inputs.is_empty():
        return None
    try:
        requests = _decode(inputs)
    except RequestError as exc:
        return Output().error(str(exc), code=exc.code, message="bad request")
    if _streaming is not None:
        return _streaming.handle(inputs, requests)
    return _output(inputs, _ranks.answer(requests))
