"""lmi_accelerate: the toolkit's Accelerate way for DJL Serving's Python engine (`option.partition=accelerate`).

Copied verbatim beside lmi_deepspeed.py into every image (/opt/lmi/python); lmi_deepspeed's DJL glue
dispatches here. One process sees every device (no MPI: the glue refuses more than one rank); Accelerate
places whole layers on GPUs, the CPU and the disk (a device map) and moves activations, or offloaded
weights, between them at run time. Slower than tensor parallelism, but any Transformers causal LM loads.

serving.properties options (besides lmi_deepspeed's model_id, dtype, max_new_tokens and its bounds):
    option.device_map             auto | balanced | balanced_low_0 | sequential (default auto: balanced over
                                  the GPUs), or an explicit JSON map {"module": 0 | "cpu" | "disk", ...}
    option.max_memory             JSON per device, e.g. {"0": "10GiB", "1": "10GiB", "cpu": "30GiB"}; what does
                                  not fit goes to the next device, last to the disk (default: free memory)
    option.offload_folder         where weights placed on "disk" are kept (needed when the map uses the disk)
    option.tensor_parallel_degree the first N visible GPUs to spread over (default max: all of them), as
                                  DJL's own Accelerate handler read it up to 0.29; max_memory, when given,
                                  decides instead
Requests and answers are lmi_deepspeed's LMI shape: {"inputs": str | [str], "parameters": {...}} ->
{"generated_text": ...}; with option.enable_streaming=true a jsonlines token stream (lmi_stream).
Importing this module costs nothing: torch, Transformers and Accelerate load with the model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace

import lmi_deepspeed  # beside this file, in the image's /opt/lmi/python

OptionError, parse_options = lmi_deepspeed.OptionError, lmi_deepspeed.parse_options

log = logging.getLogger("lmi_accelerate")

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class Options:
    model_dir: str
    dtype: str
    max_new_tokens: int
    device_map: str | dict  # a strategy or an explicit {module: device}
    max_memory: dict | None  # {gpu index | "cpu": bytes}
    offload_folder: str | None
    gpus: int  # GPUs the map may use
    limits: dict = None  # lmi_deepspeed's bound options (checked before any work, as that way checks them)


def _json_object(props: dict, key: str) -> dict:
    raw = props[key]
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        value = None
    if not isinstance(value, dict) or not value:
        raise OptionError(f"option.{key}={raw!r}: not a JSON object")
    return value


def _device(key: str, name: str, value, gpus: int, allowed: tuple[str, ...]):
    """A device as Accelerate names it: a GPU index, or one of `allowed` ("cpu", "disk")."""
    text = str(value).strip().lower().removeprefix("cuda:")
    if text.isdigit():
        if int(text) >= gpus:
            raise OptionError(f"option.{key}: {name} -> {value!r}, but {gpus} GPU(s) are usable here")
        return int(text)
    if text in allowed:
        return text
    raise OptionError(f"option.{key}: {name} -> {value!r}: use a GPU index or {' or '.join(allowed)}")


def parse_accelerate_options(props: dict, cuda: bool, visible_gpus: int) -> Options:
    """serving.properties -> Options, or OptionError naming the option that is wrong."""
    if "kernel_injection" in props:
        raise OptionError("option.kernel_injection: a DeepSpeed option; Accelerate runs the model's own layers, "
                          "remove it (or use option.partition=deepspeed)")
    base = parse_options({k: v for k, v in props.items() if k != "tensor_parallel_degree"}, 1, cuda)
    gpus = visible_gpus if cuda else 0
    raw = props.get("tensor_parallel_degree", "max")
    if str(raw).strip().lower() != "max":
        try:
            tp = int(str(raw).strip())
        except ValueError:
            raise OptionError(f"option.tensor_parallel_degree={raw!r}: not a whole number") from None
        if not 1 <= tp <= max(gpus, 1):
            raise OptionError(f"option.tensor_parallel_degree={tp}: {gpus} GPU(s) are visible to this process")
        gpus = min(tp, gpus)
    device_map: str | dict = str(props.get("device_map", "auto")).strip()
    if device_map.startswith("{"):
        device_map = {str(m): _device("device_map", str(m), d, gpus, ("cpu", "disk"))
                      for m, d in _json_object(props, "device_map").items()}
    elif device_map not in STRATEGIES:
        raise OptionError(f"option.device_map={device_map!r}: use {', '.join(STRATEGIES)} or a JSON map "
                          '{"module": 0 | "cpu" | "disk"}')
    max_memory = None
    if "max_memory" in props:
        from accelerate.utils import convert_file_size_to_int

        max_memory = {}
        for name, size in _json_object(props, "max_memory").items():
            device = _device("max_memory", name, name, gpus, ("cpu",))
            try:
                max_memory[device] = convert_file_size_to_int(size)
            except (ValueError, TypeError):
                raise OptionError(f"option.max_memory: {name} -> {size!r}: give a size like \"10GiB\" or a "
                                  "number of bytes") from None
    elif gpus < visible_gpus:  # tensor_parallel_degree: leave the other GPUs out
        max_memory = {i: _free_memory(i) for i in range(gpus)} | {"cpu": _free_memory("cpu")}
    folder = props.get("offload_folder")
    if folder is not None:
        folder = str(folder).strip()
        if not folder or "://" in folder:
            raise OptionError(f"option.offload_folder={folder!r}: give a local directory")
    return Options(model_dir=base.model_dir, dtype=base.dtype, max_new_tokens=base.max_new_tokens,
                   device_map=device_map, max_memory=max_memory, offload_folder=folder, gpus=gpus,
                   limits=base.limits)


def _free_memory(device) -> int:
    from accelerate.utils import get_max_memory

    return get_max_memory()[device]


def plan_device_map(model, strategy: str, max_memory: dict | None, dtype) -> dict:
    """Where each layer goes, as Transformers' from_pretrained(device_map=strategy) plans it: balanced over
    the GPUs (unless `sequential`), whole decoder layers kept together, what does not fit to the CPU and
    then to "disk". `model` may live on the meta device (no weights needed), but balancing asks torch for
    the GPUs it plans for: plan_for_gpus plans without them."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = model._get_no_split_modules(strategy)
    if strategy == "sequential":
        memory = get_max_memory(max_memory)
    else:
        memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=strategy == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)


def plan_for_gpus(config, gpus: int, gpu_memory_mib: int, dtype: str = "fp16", headroom: float = 0.1) -> dict:
    """The map `device_map=auto` gives `config` on `gpus` GPUs of `gpu_memory_mib` each, keeping `headroom`
    of every GPU free for the CUDA context and activations; planned on the meta device, no GPU needed.
    Balanced as Accelerate's get_balanced_memory balances (an equal share of the weights per GPU, plus 1.25
    decoder layers of slack), which cannot run here itself: it asks torch for the devices."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch_dtype)
    no_split = model._get_no_split_modules("auto")
    sizes = compute_module_sizes(model, dtype=torch_dtype)
    block = max((sizes[name] for name, module in model.named_modules() if type(module).__name__ in no_split),
                default=0)
    share = min(int(gpu_memory_mib * 2**20 * (1 - headroom)), sizes[""] // gpus + int(1.25 * block))
    return infer_auto_device_map(model, max_memory={i: share for i in range(gpus)}, no_split_module_classes=no_split,
                                 dtype=torch_dtype)


class Service(lmi_deepspeed.Service):
    """A causal LM dispatched over this process's devices by Accelerate. Requests are answered as the
    DeepSpeed way answers them (its answer and generate), on the dispatched model."""

    def __init__(self, props: dict, cuda: bool) -> None:  # the options are not the DeepSpeed way's
        visible = 0
        if cuda:
            import torch

            visible = torch.cuda.device_count()
        self.options = parse_accelerate_options(props, cuda, visible)
        self.cuda = cuda
        self.engine = self.tokenizer = self.model = None
        self.device_map: dict = {}
        self.limits = None

    def load(self) -> Service:
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        o = self.options
        dtype = getattr(torch, TORCH_DTYPES[o.dtype])
        config = AutoConfig.from_pretrained(o.model_dir, trust_remote_code=False)
        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
        if isinstance(o.device_map, dict):
            device_map = o.device_map
            unknown = sorted(set(device_map) - {name for name, _ in meta.named_modules()})
            if unknown:
                raise OptionError(f"option.device_map: no module {', '.join(unknown)} in this model")
        else:
            max_memory = o.max_memory
            if max_memory is None and not self.cuda:
                max_memory = {"cpu": _free_memory("cpu")}
            device_map = plan_device_map(meta, o.device_map, max_memory, dtype)
        if set(device_map.values()) == {"disk"}:
            raise OptionError("option.max_memory: not even the first layer fits in memory; give the CPU or a GPU "
                              "more room")
        if "disk" in device_map.values():
            if not o.offload_folder:
                raise OptionError("option.offload_folder: the device map puts weights on the disk; set it to a "
                                  "writable directory, or give option.max_memory more room")
            os.makedirs(o.offload_folder, exist_ok=True)
        tokenizer = lmi_deepspeed.load_tokenizer(o.model_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(o.model_dir, torch_dtype=dtype, device_map=device_map,
                                                         offload_folder=o.offload_folder, trust_remote_code=False)
        except ValueError as exc:  # an explicit map that misses or splits parameters
            raise OptionError(f"option.device_map: {str(exc).splitlines()[0]} (the map must cover every "
                              "module)") from None
        self.model, self.tokenizer = model.eval(), tokenizer
        self.limits = lmi_deepspeed.make_limits(o, lmi_deepspeed.model_positions(config, tokenizer))
        self.device_map = dict(getattr(model, "hf_device_map", device_map))
        # What the DeepSpeed way's generate uses of its engine: module.generate, and module.device for where
        # inputs go (the model's own .device is its first weight's, on "meta" when that weight is offloaded).
        self.engine = SimpleNamespace(module=SimpleNamespace(generate=model.generate, device=self.input_device))
        log.info("lmi_accelerate: %s on %s, %s", o.model_dir, sorted({str(d) for d in self.device_map.values()}),
                 o.dtype)
        return self

    @property
    def input_device(self) -> str:
        """Where inputs start: the first GPU of the map, else the CPU (Accelerate's hooks move them on)."""
        gpus = sorted(d for d in self.device_map.values() if isinstance(d, int))
        return f"cuda:{gpus[0]}" if gpus else "cpu"
