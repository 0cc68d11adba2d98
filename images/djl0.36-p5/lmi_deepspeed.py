"""lmi_deepspeed: the toolkit's DeepSpeed handler for DJL Serving's Python engine.

Copied verbatim into every image (at /opt/lmi/python, on the Python path of DJL's workers). DJL Serving
dropped its own DeepSpeed handler in 0.28.0; on those versions this is the default entry point
(`OPTION_ENTRYPOINT=lmi_deepspeed`), and on 0.27 it can be chosen with `option.entryPoint=lmi_deepspeed`.

How DJL runs it: in MPI mode (`option.mpi_mode=true`) DJL starts `mpirun -np <tensor_parallel_degree>`
workers, each importing this module and receiving every request; the answer of rank 0 is returned.
Each worker loads a Transformers causal LM from a local directory and hands it to
`deepspeed.init_inference`, which partitions its weights across the ranks (tensor parallelism): kernel
injection where DeepSpeed has a policy for the architecture and the GPU's SM allows it, AutoTP otherwise
(and always on CPU, where ranks talk over gloo).

serving.properties options (DJL passes them without the `option.` prefix):
    option.model_id                 a local model directory (default: the model directory, /opt/ml/model)
    option.tensor_parallel_degree   ranks to partition over; must equal the ranks DJL started
    option.dtype                    fp16 | bf16 | fp32 (default: fp16 on GPU, fp32 on CPU)
    option.max_new_tokens           default and upper bound of a request's max_new_tokens (default 256)
    option.kernel_injection         auto | true | false (default auto)
    option.trust_remote_code        false (a model's own code is never run)
Requests, in the LMI shape: {"inputs": "text" | ["text", ...], "parameters": {...}} -> {"generated_text":
"..."} or a list of them. Parameters: max_new_tokens, do_sample, temperature, top_k, top_p,
repetition_penalty, seed, return_full_text. A bad request is answered 400 with a message; a bad option
fails the model load with one line naming it.

Importing this module costs nothing: torch, Transformers and DeepSpeed load with the model.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass

log = logging.getLogger("lmi_deepspeed")

DEFAULT_MODEL_DIR = "/opt/ml/model"
DTYPES = ("fp16", "bf16", "fp32")
DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
# Architectures DeepSpeed's v1 kernel injection has a policy for (deepspeed/module_inject/replace_policy.py;
# the same set from 0.12 to 0.19). Others are partitioned with AutoTP.
KERNEL_INJECTION_MODELS = frozenset({"bert", "bloom", "distilbert", "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama",
                                     "megatron-bert", "opt"})
PARAMETERS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
              "return_full_text"}
# DJL's own properties, passed beside the model's options; not ours to check.
DJL_PROPERTIES = {"engine", "entryPoint", "mpi_mode", "model_dir", "device_id", "pipeline_parallel_degree",
                  "cluster_size", "output_formatter", "input_formatter", "job_queue_size", "batch_size",
                  "max_batch_delay", "max_idle_time", "log_request_metric", "predict_timeout", "parallel_loading"}


class OptionError(ValueError):
    """A serving.properties option is wrong: the model does not load."""


class RequestError(ValueError):
    """A request is wrong: it is answered with a 4xx status, the model stays up."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Options:
    model_dir: str
    tensor_parallel_degree: int
    dtype: str
    max_new_tokens: int
    kernel_injection: str  # auto | true | false


def _int(props: dict, key: str, default: int, low: int = 1) -> int:
    raw = props.get(key, default)
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise OptionError(f"option.{key}={raw!r}: not a whole number") from None
    if value < low:
        raise OptionError(f"option.{key}={value}: must be at least {low}")
    return value


def parse_options(props: dict, world_size: int, cuda: bool) -> Options:
    """serving.properties -> Options, or OptionError naming the option that is wrong."""
    model_dir = str(props.get("model_id") or props.get("model_dir") or DEFAULT_MODEL_DIR).strip()
    if "://" in model_dir or not os.path.isdir(model_dir):
        raise OptionError(f"option.model_id={model_dir!r}: not a local directory; this image loads models from "
                          f"{DEFAULT_MODEL_DIR} or a local path (no hub downloads)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise OptionError(f"option.model_id={model_dir!r}: no config.json there; give a Transformers model directory")
    tp = _int(props, "tensor_parallel_degree", world_size)
    if tp != world_size:
        raise OptionError(f"option.tensor_parallel_degree={tp}, but {world_size} rank(s) were started; "
                          "set option.mpi_mode=true so DJL starts one rank per partition")
    dtype = str(props.get("dtype", "fp16" if cuda else "fp32")).strip().lower()
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise OptionError(f"option.dtype={props.get('dtype')!r}: use one of {', '.join(DTYPES)}")
    if not cuda and dtype == "fp16":
        raise OptionError("option.dtype=fp16: half precision needs a GPU; use fp32 or bf16 on CPU")
    inject = str(props.get("kernel_injection", "auto")).strip().lower()
    if inject not in ("auto", "true", "false"):
        raise OptionError(f"option.kernel_injection={inject!r}: use auto, true or false")
    if str(props.get("trust_remote_code", "false")).strip().lower() not in ("false", "0", ""):
        raise OptionError("option.trust_remote_code: this handler never runs a model's own code; remove the option")
    return Options(model_dir=model_dir, tensor_parallel_degree=tp, dtype=dtype,
                   max_new_tokens=_int(props, "max_new_tokens", 256), kernel_injection=inject)


def parse_request(body, max_new_tokens: int) -> tuple[list[str], dict, bool]:
    """An LMI request -> (prompts, generation parameters, whether the answer is a list)."""
    if not isinstance(body, dict):
        raise RequestError('the body must be a JSON object: {"inputs": "...", "parameters": {...}}')
    unknown = sorted(set(body) - {"inputs", "parameters"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}: a request has 'inputs' and 'parameters'")
    inputs = body.get("inputs")
    is_list = isinstance(inputs, list)
    prompts = inputs if is_list else [inputs]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError("'inputs' must be a non-empty string or a non-empty list of non-empty strings")
    params = body.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be a JSON object")
    unknown = sorted(set(params) - PARAMETERS)
    if unknown:
        raise RequestError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(PARAMETERS))}")
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
    for key in ("top_k", "seed"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], int) or params[key] < 0):
            raise RequestError(f"{key} must be a whole number >= 0")
    out.update({k: v for k, v in params.items() if k != "max_new_tokens"})
    return prompts, out, is_list


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
    """Join the ranks into one process group. Under mpirun, rank 0 picks the rendezvous port and tells
    the others over MPI (DJL sets MASTER_ADDR but no port); a launcher that sets MASTER_PORT is used as is."""
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


class Service:
    """One rank's model: loaded once, then answers batches of requests in lockstep with the other ranks."""

    def __init__(self, options: Options, cuda: bool) -> None:
        self.options, self.cuda = options, cuda
        self.engine = self.tokenizer = None
        self.injected = False

    def load(self) -> Service:
        import deepspeed
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        o = self.options
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[o.dtype]
        config = AutoConfig.from_pretrained(o.model_dir, trust_remote_code=False)
        self.injected = self._inject(config.model_type, dtype)
        tokenizer = AutoTokenizer.from_pretrained(o.model_dir, trust_remote_code=False)
        tokenizer.padding_side = "left"  # decoder-only models continue from the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model = AutoModelForCausalLM.from_pretrained(o.model_dir, torch_dtype=dtype, trust_remote_code=False,
                                                     low_cpu_mem_usage=True).eval()
        kwargs = {"dtype": dtype, "replace_with_kernel_inject": self.injected}
        if o.tensor_parallel_degree > 1:
            kwargs["tensor_parallel"] = {"tp_size": o.tensor_parallel_degree}
        self.engine = deepspeed.init_inference(model, **kwargs)
        self.tokenizer = tokenizer
        log.info("lmi_deepspeed: %s (%s) on %d rank(s), %s, %s", o.model_dir, config.model_type,
                 o.tensor_parallel_degree, o.dtype, "kernel injection" if self.injected else "AutoTP")
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

    def generate(self, prompts: list[str], params: dict) -> list[str]:
        import torch

        device = self.engine.module.device if hasattr(self.engine.module, "device") else "cpu"
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        batch = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}
        kwargs = {"max_new_tokens": params["max_new_tokens"], "pad_token_id": self.tokenizer.pad_token_id,
                  "do_sample": params.get("do_sample", False)}
        for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if key in params:
                kwargs[key] = params[key]
        if kwargs["do_sample"]:
            # Every rank samples the same token only if every rank draws the same numbers.
            torch.manual_seed(params.get("seed", 0))
        with torch.no_grad():
            out = self.engine.module.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        if params.get("return_full_text"):
            texts = [p + t for p, t in zip(prompts, texts, strict=True)]
        return texts

    def answer(self, bodies: list) -> list[dict | list | RequestError]:
        """Answers for a batch of request bodies, each a dict (or list of dicts) or a RequestError.
        Requests with equal parameters are generated together."""
        parsed: list = []
        for body in bodies:
            try:
                parsed.append(parse_request(body, self.options.max_new_tokens))
            except RequestError as exc:
                parsed.append(exc)
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(parsed):
            if not isinstance(item, RequestError):
                groups.setdefault(json.dumps(item[1], sort_keys=True), []).append(i)
        texts: dict[int, list[str]] = {}
        for members in groups.values():
            prompts = [p for i in members for p in parsed[i][0]]
            generated = iter(self.generate(prompts, parsed[members[0]][1]))
            for i in members:
                texts[i] = [next(generated) for _ in parsed[i][0]]
        answers: list = []
        for i, item in enumerate(parsed):
            if isinstance(item, RequestError):
                answers.append(item)
            else:
                out = [{"generated_text": t} for t in texts[i]]
                answers.append(out if item[2] else out[0])
        return answers


def start(properties: dict) -> Service:
    """Load the model on this rank from DJL's properties (the model's serving.properties)."""
    import torch

    cuda = torch.cuda.is_available()
    rank, world, _ = _rank_environment()
    options = parse_options(properties, world, cuda)  # before any rank waits on another
    init_ranks(cuda)
    return Service(options, cuda).load()


# --- DJL Serving's Python engine entry point -----------------------------------------------------------

_service: Service | None = None


def handle(inputs):
    """DJL's entry point: the first call (empty) loads the model; later calls carry a batch of requests."""
    from djl_python.outputs import Output

    global _service
    if _service is None:
        try:
            _service = start(inputs.get_properties())
        except OptionError as exc:
            raise ValueError(f"lmi_deepspeed: {exc}") from None  # DJL fails the model load with this line
    if inputs.is_empty():
        return None
    batch = inputs.get_batches()
    bodies: list = []
    for item in batch:
        try:
            bodies.append(item.get_as_json())
        except ValueError:
            bodies.append(None)  # parse_request answers it: the body must be a JSON object
    answers = _service.answer(bodies)
    if len(batch) == 1 and isinstance(answers[0], RequestError):
        return Output().error(str(answers[0]), code=answers[0].code, message="bad request")
    outputs = Output()
    for i, answer in enumerate(answers):
        # As DJL's own handlers do: each answer under its request's key; an error as {"error", "code"}.
        value = {"error": str(answer), "code": answer.code} if isinstance(answer, RequestError) else answer
        outputs.add_as_json(value, key=inputs.get_content().key_at(i))
    outputs.add_property("content-type", "application/json")
    return outputs
