"""lmi_diffusion: the toolkit's Diffusion way (Stable Diffusion) for DJL Serving's Python engine.

Copied verbatim beside lmi_deepspeed.py into every image (/opt/lmi/python); lmi_deepspeed's DJL glue
dispatches here when the model directory holds a Diffusers pipeline (model_index.json). One process, one
device: a Diffusers pipeline on the GPU in fp16/bf16, with DeepSpeed's kernel injection where DeepSpeed
supports it (its generic injection of Stable Diffusion's UNet, VAE and CLIP text encoder: fp16 only), or
plain Diffusers in fp32 on the CPU.

serving.properties options:
    option.model_id              a local Diffusers pipeline directory (default the model directory)
    option.dtype                 fp16 | bf16 | fp32 (default fp16 on GPU, fp32 on CPU)
    option.kernel_injection      auto | true | false (default auto: on with a GPU in fp16, for pipelines
                                 DeepSpeed supports: see Service._inject)
    option.max_inference_steps   upper bound of num_inference_steps (default 50, also the default per request)
    option.max_height, option.max_width   upper bound in pixels (default 1024 each on a GPU, 512 on the CPU)
    option.max_images            upper bound of num_images_per_prompt (default 4)
    option.max_pixel_steps       upper bound of height x width x num_inference_steps x images (default
                                 1024 x 1024 x 50 on a GPU, 512 x 512 x 20 on the CPU)
    option.max_prompt_chars      characters of prompt and of negative_prompt (default 4096; CLIP reads 77 tokens)
    option.max_image_bytes       bytes of an img2img image as sent, base64 (default 16 MiB)
    option.max_body_bytes, option.max_body_depth   as lmi_deepspeed (defaults: 24 MiB, 16)
No code from the model directory: the pipeline and every component must be Diffusers' or Transformers' own
classes (model_index.json is read before anything loads), and no .py file may be in the pipeline directory.
Requests: `Content-Type: application/json` {"prompt": str, "parameters": {...}, "image": base64 PNG/JPEG
(optional: image-to-image; the image sets the size, height/width are refused)} or a `text/*` body as the
prompt. Parameters: num_inference_steps,
guidance_scale, height, width, negative_prompt, num_images_per_prompt, seed, strength (with an image).
Answers: the first image as PNG (`image/png`, the default and for Accept image/png, image/*, */*), or with
`Accept: application/json` {"images": [base64 PNG, ...], "seed": n}; Accept is read as RFC 9110 says
(q-values, wildcards, q=0 excludes). height alone keeps the model's default width, and width alone its
height. The same seed gives the same image.
A request over a limit is refused (400, with the limit's option), never run; a request the pipeline
fails on is a 424 for that request only.

Importing this module costs nothing: torch, Diffusers and DeepSpeed load with the model.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
from dataclasses import dataclass

from lmi_deepspeed import (  # beside this file, in the image's /opt/lmi/python
    DEFAULT_MODEL_DIR,
    OptionError,
    Reply,
    Request,
    RequestError,
    input_error,
    model_error,
    parse_dtype,
    parse_kernel_injection,
)

log = logging.getLogger("lmi_diffusion")

PARAMETERS = {"num_inference_steps", "guidance_scale", "height", "width", "negative_prompt",
              "num_images_per_prompt", "seed", "strength"}
PNG_ACCEPTS = ("", "*/*", "image/*", "image/png")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Options:
    model_dir: str
    dtype: str
    kernel_injection: str  # auto | true | false
    max_inference_steps: int
    max_height: int
    max_width: int
    max_images: int
    max_pixel_steps: int = 512 * 512 * 20
    max_prompt_chars: int = 4096
    max_image_bytes: int = 16 << 20
    max_body_bytes: int = 24 << 20
    max_body_depth: int = 16


def _whole(props: dict, key: str, default: int, low: int = 1) -> int:
    raw = props.get(key, default)
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise OptionError(f"option.{key}={raw!r}: not a whole number") from None
    if value < low:
        raise OptionError(f"option.{key}={value}: must be at least {low}")
    return value


def parse_options(props: dict, cuda: bool) -> Options:
    """serving.properties -> Options, or OptionError naming the option that is wrong."""
    model_dir = str(props.get("model_id") or props.get("model_dir") or DEFAULT_MODEL_DIR).strip()
    if "://" in model_dir or not os.path.isdir(model_dir):
        raise OptionError(f"option.model_id={model_dir!r}: not a local directory; this image loads models from "
                          f"{DEFAULT_MODEL_DIR} or a local path (no hub downloads)")
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        raise OptionError(f"option.model_id={model_dir!r}: no model_index.json there; give a Diffusers pipeline "
                          "directory")
    tp = _whole(props, "tensor_parallel_degree", 1)
    if tp != 1:
        raise OptionError(f"option.tensor_parallel_degree={tp}: a diffusion pipeline runs on one device "
                          "(DeepSpeed's kernel injection does not partition it); set 1 or remove it")
    dtype, inject = parse_dtype(props, cuda), parse_kernel_injection(props)
    if inject == "true" and (not cuda or dtype != "fp16"):
        raise OptionError("option.kernel_injection=true: DeepSpeed injects its diffusion kernels only on a GPU "
                          "in fp16; set option.dtype=fp16 or option.kernel_injection=false")
    if str(props.get("trust_remote_code", "false")).strip().lower() not in ("false", "0", ""):
        raise OptionError("option.trust_remote_code: this handler never runs a model's own code; remove the option")
    side = 1024 if cuda else 512  # a CPU draws a 512 x 512 image at one step in seconds, 1024 x 1024 in minutes
    sizes = {key: _whole(props, key, side, low=8) for key in ("max_height", "max_width")}
    for key, value in sizes.items():
        if value % 8:
            raise OptionError(f"option.{key}={value}: must be a multiple of 8")
    check_pipeline(model_dir)
    return Options(model_dir=model_dir, dtype=dtype, kernel_injection=inject, max_images=_whole(props, "max_images", 4),
                   max_inference_steps=_whole(props, "max_inference_steps", 50), **sizes,
                   max_pixel_steps=_whole(props, "max_pixel_steps", side * side * (50 if cuda else 20)),
                   max_prompt_chars=_whole(props, "max_prompt_chars", 4096),
                   max_image_bytes=_whole(props, "max_image_bytes", 16 << 20),
                   max_body_bytes=_whole(props, "max_body_bytes", 24 << 20),
                   max_body_depth=_whole(props, "max_body_depth", 16))


def check_pipeline(model_dir: str) -> None:
    """Refuse a pipeline that would run code from its directory, before Diffusers reads it: Diffusers imports
    a pipeline class or a component's library named in model_index.json from the directory (custom
    pipelines and components; it checks trust_remote_code only on its hub path). So the pipeline class must
    be one of Diffusers' own, every component ("name": [library, class]) a class of Diffusers (or one of its
    pipeline modules) or Transformers, and no .py file may be in the directory."""
    path = os.path.join(model_dir, "model_index.json")
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
    except (OSError, ValueError) as exc:
        raise OptionError(f"option.model_id: {path} is not readable JSON ({exc})") from None
    if not isinstance(index, dict):
        raise OptionError(f"option.model_id: {path} is not a JSON object")
    code = sorted(os.path.relpath(os.path.join(root, f), model_dir) for root, _, files in os.walk(model_dir)
                  for f in files if f.endswith((".py", ".pyc", ".so")))
    if code:
        raise OptionError(f"option.model_id: the pipeline directory holds code ({', '.join(code[:5])}); this handler "
                          "never runs a model's own code: remove it")
    if not index:
        return  # nothing to load: Diffusers itself refuses it at the load
    import diffusers
    import transformers

    name = index.get("_class_name")
    if not isinstance(name, str) or not isinstance(getattr(diffusers, name, None), type):
        raise OptionError(f"option.model_id: model_index.json names the pipeline {name!r}, which is not one of "
                          "Diffusers' own pipeline classes (a custom pipeline would run the model's code)")
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list):
            continue
        if value in ([None, None], [None]) or value == []:
            continue
        library, cls = (value + [None, None])[:2]
        if library == "diffusers":
            module = diffusers
        elif library == "transformers":
            module = transformers
        elif isinstance(library, str) and library.isidentifier() and hasattr(diffusers.pipelines, library):
            module = getattr(diffusers.pipelines, library)  # e.g. stable_diffusion's safety checker
        else:
            module = None
        if module is None or not isinstance(cls, str) or not isinstance(getattr(module, cls, None), type):
            raise OptionError(f"option.model_id: component {key!r} is {value!r}, not a class of Diffusers or "
                              "Transformers (a custom component would run the model's code)")


def _whole_param(params: dict, key: str, low: int, high: int, option: str) -> None:
    value = params.get(key)
    if key in params and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise RequestError(f"{key} must be a whole number from {low} to {high} ({option})")


@dataclass(frozen=True)
class Job:
    """One checked request: what to ask the pipeline for and how to answer."""

    prompt: str
    params: dict  # pipeline keyword arguments, limits checked
    seed: int
    image: object | None  # a PIL image for image-to-image
    as_json: bool


def parse_accept(accept: str) -> list[tuple[str, float]]:
    """An Accept header -> [(media range, q)], as RFC 9110 section 12.5.1 reads it: comma-separated ranges,
    each with parameters; q from 0 to 1 (default 1); a malformed q counts as 0."""
    ranges = []
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        kind = fields[0].lower()
        if not kind:
            continue
        q = 1.0
        for field in fields[1:]:
            key, _, value = field.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                q = q if 0.0 <= q <= 1.0 else 0.0
        ranges.append((kind, q))
    return ranges


def _quality(ranges: list[tuple[str, float]], media: str) -> float:
    """The q the most specific matching range gives `media` (RFC 9110: type/subtype > type/* > */*)."""
    best, q = -1, 0.0
    top = media.split("/")[0]
    for kind, value in ranges:
        rank = 2 if kind == media else 1 if kind == f"{top}/*" else 0 if kind == "*/*" else -1
        if rank > best:
            best, q = rank, value
    return q if best >= 0 else 0.0


def wants_json(accept: str) -> bool:
    """Accept -> True for JSON, False for PNG (the default, and the choice on a tie), or RequestError(406)."""
    ranges = parse_accept(accept)
    if not ranges:
        return False
    png_q, json_q = _quality(ranges, "image/png"), _quality(ranges, "application/json")
    if png_q <= 0 and json_q <= 0:
        raise RequestError(f"cannot answer Accept: {accept[:200]}; this model answers image/png or "
                           "application/json", 406)
    return json_q > png_q


def parse_request(request: Request, o: Options, default_size: tuple[int, int]) -> Job:
    """A request -> Job, or RequestError saying what is wrong (before anything runs)."""
    as_json = wants_json(request.accept)
    image = None
    if request.content_type.startswith("text/"):
        body = {"prompt": request.text(o.max_body_bytes)}
    elif request.content_type in ("", "application/json"):
        body = request.json(o.max_body_depth, o.max_body_bytes)
        if not isinstance(body, dict):
            raise RequestError('the body must be a JSON object: {"prompt": "...", "parameters": {...}}')
    else:
        raise RequestError(f"cannot read Content-Type {request.content_type}; send application/json or text/plain",
                           415)
    unknown = sorted(set(body) - {"prompt", "parameters", "image"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)[:200]}: a request has 'prompt', 'parameters' and "
                           "optionally 'image'")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("'prompt' must be a non-empty string")
    if len(prompt) > o.max_prompt_chars:
        raise RequestError(f"a prompt of {len(prompt)} characters, over option.max_prompt_chars={o.max_prompt_chars}")
    params = body.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be a JSON object")
    unknown = sorted(set(params) - PARAMETERS)
    if unknown:
        raise RequestError(f"unknown parameter(s) {', '.join(unknown)[:200]}; known: {', '.join(sorted(PARAMETERS))}")
    _whole_param(params, "num_inference_steps", 1, o.max_inference_steps, "option.max_inference_steps")
    _whole_param(params, "num_images_per_prompt", 1, o.max_images, "option.max_images")
    _whole_param(params, "seed", 0, MAX_SEED, "a 63-bit seed")
    for key, default, limit in (("height", default_size[0], o.max_height), ("width", default_size[1], o.max_width)):
        value = params.get(key, default)
        if key not in params and value > limit:
            raise RequestError(f"the model's default {key} {value} is over option.max_{key}={limit}; ask for a "
                               f"smaller {key}")
        _whole_param(params, key, 8, limit, f"option.max_{key}")
        if value % 8:
            raise RequestError(f"{key} must be a multiple of 8")
    if "guidance_scale" in params:
        value = params["guidance_scale"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise RequestError("guidance_scale must be a number from 0 to 100")
    if "negative_prompt" in params:
        value = params["negative_prompt"]
        if not isinstance(value, str):
            raise RequestError("negative_prompt must be a string")
        if len(value) > o.max_prompt_chars:
            raise RequestError(f"a negative_prompt of {len(value)} characters, over option.max_prompt_chars="
                               f"{o.max_prompt_chars}")
    steps = params.get("num_inference_steps", min(50, o.max_inference_steps))
    if "image" in body:
        if "height" in params or "width" in params:
            raise RequestError("height and width do not apply to image-to-image: the image sets the size")
        image = _image(body["image"], o)
        height, width = image.height, image.width
    else:
        height, width = params.get("height", default_size[0]), params.get("width", default_size[1])
    if "strength" in params:
        value = params["strength"]
        if image is None:
            raise RequestError("strength applies to image-to-image: send an 'image' too")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise RequestError("strength must be a number in (0, 1]")
    if image is not None and int(steps * params.get("strength", 0.8)) < 1:  # Diffusers' default strength 0.8
        raise RequestError(f"num_inference_steps {steps} x strength {params.get('strength', 0.8)} is less than one "
                           "denoising step; ask for more steps or a higher strength")
    work = height * width * steps * params.get("num_images_per_prompt", 1)
    if work > o.max_pixel_steps:
        raise RequestError(f"height x width x num_inference_steps x images = {height} x {width} x {steps} x "
                           f"{params.get('num_images_per_prompt', 1)}, over option.max_pixel_steps={o.max_pixel_steps}")
    seed = params.get("seed", random.randrange(MAX_SEED))
    kwargs = {k: v for k, v in params.items() if k != "seed"}
    kwargs["num_inference_steps"] = steps
    if image is None:  # both sides, always: one given keeps the model's default for the other
        kwargs.update(height=height, width=width)
    return Job(prompt=prompt, params=kwargs, seed=seed, image=image, as_json=as_json)


def _image(data, o: Options):
    """A base64 PNG/JPEG -> an RGB PIL image; its size is checked from the header, before decoding."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise RequestError("'image' must be a base64 string of a PNG or JPEG image")
    if len(data) > o.max_image_bytes:
        raise RequestError(f"'image' is {len(data)} bytes, over option.max_image_bytes={o.max_image_bytes}")
    try:
        raw = base64.b64decode(data, validate=True)
        image = Image.open(io.BytesIO(raw))
    except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise RequestError("'image' is not a base64 PNG or JPEG image") from None
    if image.format not in ("PNG", "JPEG"):
        raise RequestError(f"'image' is {image.format}; send a PNG or JPEG image")
    # The size from the header, before a pixel is decoded: a decompression bomb is refused here.
    if image.height > o.max_height or image.width > o.max_width:
        raise RequestError(f"'image' is {image.width}x{image.height}, over option.max_width={o.max_width} x "
                           f"option.max_height={o.max_height}")
    if image.height < 8 or image.width < 8:
        raise RequestError(f"'image' is {image.width}x{image.height}; send at least 8x8 pixels")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise RequestError("'image' is truncated or corrupt: send a whole PNG or JPEG image") from None


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class Service:
    """A Diffusers pipeline on one device."""

    def __init__(self, props: dict, cuda: bool) -> None:
        self.options = parse_options(props, cuda)
        self.cuda = cuda
        self.pipe = self.img2img = None
        self.injected = False
        self.default_size = (512, 512)

    def load(self) -> Service:
        import inspect

        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # no progress bars in the server's log
        o = self.options
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[o.dtype]
        pipe = DiffusionPipeline.from_pretrained(o.model_dir, torch_dtype=dtype, local_files_only=True)
        if "prompt" not in inspect.signature(pipe.__call__).parameters:
            raise OptionError(f"option.model_id: {type(pipe).__name__} does not take a prompt; this handler serves "
                              "text-to-image pipelines")
        pipe = pipe.to("cuda" if self.cuda else "cpu")
        scale = getattr(pipe, "vae_scale_factor", 8)
        sample = getattr(getattr(pipe, "unet", None), "config", None)
        if sample is not None:
            size = sample.sample_size
            height, width = (size, size) if isinstance(size, int) else size
            self.default_size = (height * scale, width * scale)
        self.img2img = self._img2img(pipe)
        self.injected = self._inject(pipe)
        if self.injected:
            import deepspeed

            # DeepSpeed's generic injection (fp16 only) swaps the UNet, the VAE and the CLIP text encoder for its
            # kernels. CUDA graphs stay off: they would pin one height, width and batch for every request.
            pipe = deepspeed.init_inference(pipe, dtype=torch.float16, replace_with_kernel_inject=True,
                                            enable_cuda_graph=False)
        self.pipe = pipe
        log.info("lmi_diffusion: %s on %s, %s%s", o.model_dir, "GPU" if self.cuda else "CPU", o.dtype,
                 ", DeepSpeed kernel injection" if self.injected else "")
        return self

    def _inject(self, pipe) -> bool:
        """DeepSpeed's kernel injection where it supports the pipeline: its generic injection wraps
        `text_encoder` (a CLIP text model), `unet` and `vae`, in fp16 on a GPU, and its UNet wrapper passes on
        only the sample, the timestep and the text embeddings (no class or added conditioning, as SDXL needs)."""
        choice = self.options.kernel_injection
        if choice == "false" or not self.cuda or self.options.dtype != "fp16":  # "true" refused then (options)
            return False
        unet, text_encoder = getattr(pipe, "unet", None), getattr(pipe, "text_encoder", None)
        reason = None
        if unet is None or type(unet).__name__ != "UNet2DConditionModel" or getattr(pipe, "vae", None) is None:
            reason = f"DeepSpeed's injection needs a UNet2DConditionModel and a VAE; {type(pipe).__name__} has not"
        elif type(text_encoder).__name__ != "CLIPTextModel":
            reason = "DeepSpeed's injection needs a CLIP text encoder"
        elif unet.config.get("class_embed_type") or unet.config.get("addition_embed_type"):
            reason = "DeepSpeed's UNet wrapper drops class and added conditioning, which this UNet uses"
        if reason and choice == "true":
            raise OptionError(f"option.kernel_injection=true: {reason}")
        if reason:
            log.info("lmi_diffusion: plain Diffusers: %s", reason)
        return reason is None

    @staticmethod
    def _img2img(pipe):
        """The image-to-image pipeline sharing `pipe`'s modules, where Diffusers has one for it."""
        from diffusers import AutoPipelineForImage2Image

        try:
            return AutoPipelineForImage2Image.from_pipe(pipe)
        except ValueError:
            return None

    def run(self, job: Job) -> list:
        """The images of one checked request (PIL)."""
        import torch

        generator = torch.Generator("cpu").manual_seed(job.seed)  # the same noise on any device
        if job.image is None:
            return self.pipe(prompt=job.prompt, generator=generator, **job.params).images
        if self.img2img is None:
            raise RequestError(f"{type(self.pipe).__name__} has no image-to-image variant; send no 'image'")
        return self.img2img(prompt=job.prompt, image=job.image, generator=generator, **job.params).images

    def answer(self, requests: list[Request]) -> list[Reply | dict | RequestError]:
        """One answer per request, in order: a PNG Reply, {"images", "seed"} (Accept JSON) or RequestError."""
        answers: list = []
        for request in requests:
            try:
                job = parse_request(request, self.options, self.default_size)
            except RequestError as exc:
                answers.append(exc)
                continue
            except Exception as exc:  # an input no check foresaw: still only its own
                log.warning("lmi_diffusion: a request was refused", exc_info=True)
                answers.append(input_error(exc))
                continue
            try:
                images = self.run(job)
            except RequestError as exc:
                answers.append(exc)
                continue
            except Exception as exc:  # the pipeline failed: a 424 for this request only
                log.error("lmi_diffusion: the pipeline failed", exc_info=True)
                answers.append(model_error(exc))
                continue
            if job.as_json:
                answers.append({"images": [base64.b64encode(png(i)).decode("ascii") for i in images],
                                "seed": job.seed})
            else:
                answers.append(Reply(png(images[0]), "image/png"))
        return answers


# --- a tiny random pipeline: real loading code, no hub ------------------------------------------------


def make_tiny_pipeline(path: str, seed: int = 0) -> str:
    """A tiny Stable Diffusion pipeline with random weights (UNet, CLIP text encoder, VAE, DDIM scheduler,
    a CLIP tokenizer from a locally written byte-level vocabulary), saved as a Diffusers pipeline directory.
    It draws 64x64 images."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    os.makedirs(path, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as fh:
        json.dump({t: i for i, t in enumerate(tokens)}, fh)
    with open(merges_file, "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")  # no merges: one token per character
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    for name in (vocab_file, merges_file):  # the tokenizer's copies live in tokenizer/
        os.remove(name)
    return path


def reference_image(path: str, prompt: str, seed: int, **kwargs):
    """The first image plain Diffusers draws (fp32, CPU): what the service must reproduce."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]
