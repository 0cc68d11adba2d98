"""The handler's Accelerate and Diffusion ways (buildkit/resources/image/lmi_accelerate.py, lmi_diffusion.py) with
real Accelerate, Transformers and Diffusers on CPU: options and requests checked, a tiny causal LM dispatched
over the CPU and the disk, a device map planned for every GPU family of the facts, and a tiny random Stable
Diffusion pipeline whose PNG must equal plain Diffusers' image for the same seed."""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys

import lmi_check
import pytest
from conftest import ROOT
from lmi_deepspeed import OptionError, Reply, Request, RequestError

from buildkit import facts as facts_mod
from buildkit.profiles import REGISTRY

# Their prerequisites (mpirun, DeepSpeed, Accelerate, Diffusers, the registry) are the project's to provide:
# under CI a skip here fails the run (tests/conftest.py).
pytestmark = pytest.mark.required_in_ci

PROMPTS = ["hello world", "the cat sat on the mat"]
TOKENS = 8


def one_line(exc: Exception) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


def json_request(body, accept: str = "") -> Request:
    return Request(json.dumps(body).encode(), "application/json", accept)


def test_importing_the_ways_costs_nothing_and_works_flat_as_in_the_image() -> None:
    code = ("import sys; sys.path.insert(0, 'buildkit/resources/image'); import lmi_accelerate, lmi_diffusion; "
            "heavy = [m for m in "
            "('torch', 'transformers', 'diffusers', 'accelerate', 'deepspeed') if m in sys.modules]; "
            "assert not heavy, heavy; assert lmi_diffusion.OptionError is sys.modules['lmi_deepspeed'].OptionError")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# --- Accelerate -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accel():
    pytest.importorskip("accelerate")
    import lmi_accelerate

    return lmi_accelerate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, accel):
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    lmi_check.make_tiny_model(path)
    return {"dir": path, "reference": lmi_check.reference_generate(path, PROMPTS, TOKENS)}


def test_accelerate_options(accel, tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    o = accel.parse_accelerate_options({"model_id": str(tmp_path), "device_map": "balanced_low_0",
                                        "max_memory": '{"0": "10GiB", "cuda:1": 1000, "cpu": "2GB"}',
                                        "offload_folder": "/tmp/x", "engine": "Python"}, cuda=True, visible_gpus=2)
    assert (o.device_map, o.max_memory, o.dtype, o.gpus) == ("balanced_low_0", {0: 10 * 2**30, 1: 1000,
                                                                                  "cpu": 2 * 10**9}, "fp16", 2)
    o = accel.parse_accelerate_options({"model_id": str(tmp_path), "device_map": '{"model": 1, "lm_head": "disk"}'},
                                       cuda=True, visible_gpus=2)
    assert o.device_map == {"model": 1, "lm_head": "disk"} and o.max_memory is None


@pytest.mark.parametrize("props,gpus,message", [
    ({"device_map": "fast"}, 0, "option.device_map='fast': use auto, balanced, balanced_low_0, sequential"),
    ({"device_map": "{not json"}, 0, "option.device_map='{not json': not a JSON object"),
    ({"device_map": '{"model": 2}'}, 2, "option.device_map: model -> 2, but 2 GPU(s) are usable here"),
    ({"device_map": '{"model": "tpu"}'}, 0, "option.device_map: model -> 'tpu': use a GPU index or cpu or disk"),
    ({"max_memory": '{"cpu": "lots"}'}, 0, "option.max_memory: cpu -> 'lots': give a size like"),
    ({"max_memory": '{"0": "1GiB"}'}, 0, "option.max_memory: 0 -> '0', but 0 GPU(s) are usable here"),
    ({"max_memory": '{"disk": "1GiB"}'}, 0, "option.max_memory: disk -> 'disk': use a GPU index or cpu"),
    ({"max_memory": "[]"}, 0, "option.max_memory='[]': not a JSON object"),
    ({"tensor_parallel_degree": "4"}, 2, "option.tensor_parallel_degree=4: 2 GPU(s) are visible"),
    ({"tensor_parallel_degree": "x"}, 2, "option.tensor_parallel_degree='x': not a whole number"),
    ({"offload_folder": "s3://bucket/off"}, 0, "option.offload_folder='s3://bucket/off': give a local directory"),
    ({"kernel_injection": "true"}, 0, "option.kernel_injection: a DeepSpeed option"),
    ({"dtype": "fp16"}, 0, "option.dtype=fp16: half precision needs a GPU"),
    ({"model_id": "/nonexistent"}, 0, "not a local directory"),
])
def test_a_bad_accelerate_option_is_one_line_naming_it(accel, tmp_path, props, gpus, message) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OptionError) as err:
        accel.parse_accelerate_options({"model_id": str(tmp_path), **props}, cuda=gpus > 0, visible_gpus=gpus)
    assert message in one_line(err.value)


def _ask(service, prompts=PROMPTS) -> list[str]:
    (answer,) = service.answer([json_request({"inputs": prompts, "parameters": {"max_new_tokens": TOKENS}})])
    return [a["generated_text"] for a in answer]


def test_accelerate_offloading_to_cpu_and_disk_answers_as_plain_transformers(accel, tiny, tmp_path) -> None:
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("accelerate").init_empty_weights():
        sizes = compute_module_sizes(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny["dir"])))
    # Room for the embeddings and one decoder layer, besides the largest layer Accelerate keeps free on the
    # main device for offloaded weights: the second layer and the head must go to the disk.
    budget = sizes["model.embed_tokens"] + 2 * sizes["model.layers.0"] + 1024
    service = accel.Service({"model_id": tiny["dir"], "max_memory": json.dumps({"cpu": budget}),
                             "offload_folder": str(tmp_path / "offload")}, cuda=False).load()
    assert service.device_map["model.layers.0"] == "cpu" and service.device_map["model.layers.1"] == "disk"
    # Offloaded weights are not in memory: they are read from the disk when their layer runs.
    assert service.model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert _ask(service) == tiny["reference"]
    (single,) = service.answer([json_request({"inputs": PROMPTS[0], "parameters": {"max_new_tokens": TOKENS}})])
    assert single == {"generated_text": tiny["reference"][0]}


def test_accelerate_explicit_map_answers_as_plain_transformers(accel, tiny, tmp_path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny["dir"]))
    # Every module named (the embeddings, norm, rotary embedding as this Transformers version has them),
    # the first decoder layer on the disk.
    device_map = {f"model.{name}": "cpu" for name, _ in meta.model.named_children() if name != "layers"}
    device_map |= {"model.layers.0": "disk", "model.layers.1": "cpu", "lm_head": "cpu"}
    service = accel.Service({"model_id": tiny["dir"], "device_map": json.dumps(device_map),
                             "offload_folder": str(tmp_path)}, cuda=False).load()
    assert service.device_map == device_map
    assert _ask(service) == tiny["reference"]
    bad = service.answer([json_request({"inputs": "hi", "parameters": {"max_new_tokens": 10**6}}),
                          Request(b"{", "application/json")])
    assert [type(b) for b in bad] == [RequestError, RequestError]
    assert "max_new_tokens must be a whole number from 1 to 64" in one_line(bad[0])  # half the 128 positions
    assert one_line(bad[1]) == "the body is not JSON"


@pytest.mark.parametrize("props,message", [
    ({"device_map": '{"model": "cpu", "lm_head": "cpu", "model.bogus": "cpu"}'}, "no module model.bogus"),
    ({"device_map": '{"model.embed_tokens": "cpu", "model.layers": "cpu"}'}, "doesn't have any device set"),
    ({"max_memory": '{"cpu": 1000}'}, "option.max_memory: not even the first layer fits in memory"),
    ({"max_memory": '{"cpu": "300KB"}'}, "option.offload_folder: the device map puts weights on the disk"),
])
def test_a_map_that_cannot_load_is_one_line(accel, tiny, props, message) -> None:
    with pytest.raises(OptionError) as err:
        accel.Service({"model_id": tiny["dir"], **props}, cuda=False).load()
    assert message in one_line(err.value)


def gpu_families() -> list:
    return [f for f in facts_mod.load(REGISTRY).families.values() if f.is_gpu]


def gpu_memory_mib(family) -> int:
    assert family.gpu_memory_mib, f"buildkit/data/instances.yaml: {family.name} has no gpu_memory_mib"
    return family.gpu_memory_mib


@pytest.mark.parametrize("family", gpu_families(), ids=lambda f: f.name)
def test_a_model_that_fits_a_family_is_planned_on_every_gpu_and_nothing_on_disk(accel, family) -> None:
    gpus, mib = family.max_gpus, gpu_memory_mib(family)
    assert gpus >= 1 and mib > 0
    # About 60% of what the GPUs hold: it fits with room to spare, and would fit on fewer GPUs too.
    plan = accel.plan_for_gpus(_llama(0.6 * gpus * mib * 2**20, layers=8 * gpus), gpus, mib, dtype="fp16")
    assert set(plan.values()) == set(range(gpus)), plan  # every GPU, no "cpu", no "disk"


def test_a_model_larger_than_a_familys_gpus_is_planned_partly_on_disk(accel) -> None:
    family = min(gpu_families(), key=lambda f: f.max_gpus * gpu_memory_mib(f))
    gpus, mib = family.max_gpus, gpu_memory_mib(family)
    plan = accel.plan_for_gpus(_llama(1.2 * gpus * mib * 2**20, layers=8 * gpus), gpus, mib, dtype="fp16")
    assert "disk" in plan.values()


def _llama(size: float, layers: int):
    """A Llama-shaped config of about `size` bytes in fp16 (per layer ~ 10 h^2 weights: attention 4 h^2,
    gated MLP 3 * h * 2h)."""
    from transformers import LlamaConfig

    hidden = int(math.sqrt(size / (20 * layers))) // 128 * 128
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000)


# --- Diffusion --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diff():
    pytest.importorskip("diffusers")
    import lmi_diffusion

    return lmi_diffusion


@pytest.fixture(scope="module")
def sd(tmp_path_factory, diff):
    path = diff.make_tiny_pipeline(str(tmp_path_factory.mktemp("sd") / "pipe"))
    return {"dir": path, "service": diff.Service({"model_id": path, "max_inference_steps": "4", "max_images": "2",
                                                  "max_height": "128", "max_width": "128"}, cuda=False).load()}


def pixels(data: bytes):
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


def test_diffusion_options(diff, tmp_path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    o = diff.parse_options({"model_id": str(tmp_path)}, cuda=True)
    assert (o.dtype, o.kernel_injection, o.max_inference_steps, o.max_height, o.max_width, o.max_images) == (
        "fp16", "auto", 50, 1024, 1024, 4)
    assert diff.parse_options({"model_id": str(tmp_path), "dtype": "bfloat16"}, cuda=False).dtype == "bf16"


@pytest.mark.parametrize("props,cuda,message", [
    ({"model_id": "/nonexistent"}, False, "not a local directory"),
    ({"dtype": "fp16"}, False, "option.dtype=fp16: half precision needs a GPU"),
    ({"dtype": "int4"}, True, "option.dtype='int4': use one of fp16, bf16, fp32"),
    ({"kernel_injection": "yes"}, True, "option.kernel_injection='yes': use auto, true or false"),
    ({"kernel_injection": "true", "dtype": "bf16"}, True, "option.kernel_injection=true: DeepSpeed injects"),
    ({"kernel_injection": "true"}, False, "option.kernel_injection=true: DeepSpeed injects"),
    ({"tensor_parallel_degree": "2"}, True, "option.tensor_parallel_degree=2: a diffusion pipeline runs on one"),
    ({"max_inference_steps": "0"}, False, "option.max_inference_steps=0: must be at least 1"),
    ({"max_height": "500"}, False, "option.max_height=500: must be a multiple of 8"),
    ({"max_width": "wide"}, False, "option.max_width='wide': not a whole number"),
    ({"max_images": "-1"}, False, "option.max_images=-1: must be at least 1"),
    ({"trust_remote_code": "true"}, False, "option.trust_remote_code"),
])
def test_a_bad_diffusion_option_is_one_line_naming_it(diff, tmp_path, props, cuda, message) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(OptionError) as err:
        diff.parse_options({"model_id": str(tmp_path), **props}, cuda=cuda)
    assert message in one_line(err.value)


def test_a_transformers_directory_is_not_a_pipeline(diff, tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OptionError, match="no model_index.json there"):
        diff.parse_options({"model_id": str(tmp_path)}, cuda=False)


def test_the_png_equals_plain_diffusers_for_the_same_seed(diff, sd) -> None:
    import numpy as np

    reference = np.asarray(diff.reference_image(sd["dir"], "a red cat", seed=7, num_inference_steps=2))
    body = {"prompt": "a red cat", "parameters": {"num_inference_steps": 2, "seed": 7}}
    png, as_json, text = sd["service"].answer([json_request(body, "image/png"), json_request(body, "application/json"),
                                               Request(b"a red cat", "text/plain")])
    assert isinstance(png, Reply) and png.content_type == "image/png"
    assert reference.shape == (64, 64, 3) and np.array_equal(pixels(png.body), reference)
    assert as_json["seed"] == 7 and len(as_json["images"]) == 1
    assert np.array_equal(pixels(base64.b64decode(as_json["images"][0])), reference)
    assert isinstance(text, Reply) and pixels(text.body).shape == (64, 64, 3)  # a random seed, the default steps


def test_image_to_image_is_deterministic(diff, sd) -> None:
    import numpy as np

    first = sd["service"].answer([json_request({"prompt": "a cat"})])[0]
    body = {"prompt": "a blue cat", "image": base64.b64encode(first.body).decode(),
            "parameters": {"num_inference_steps": 4, "strength": 0.5, "seed": 3}}
    a, b = sd["service"].answer([json_request(body), json_request(body)])
    assert np.array_equal(pixels(a.body), pixels(b.body)) and not np.array_equal(pixels(a.body), pixels(first.body))


def _tiny_png(size: int) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("request_,code,message", [
    (json_request({"prompt": "x", "parameters": {"num_inference_steps": 5}}), 400,
     "num_inference_steps must be a whole number from 1 to 4 (option.max_inference_steps)"),
    (json_request({"prompt": "x", "parameters": {"height": 256}}), 400,
     "height must be a whole number from 8 to 128 (option.max_height)"),
    (json_request({"prompt": "x", "parameters": {"width": 60}}), 400, "width must be a multiple of 8"),
    (json_request({"prompt": "x", "parameters": {"num_images_per_prompt": 3}}), 400,
     "num_images_per_prompt must be a whole number from 1 to 2 (option.max_images)"),
    (json_request({"prompt": "x", "parameters": {"seed": -1}}), 400, "seed must be a whole number from 0"),
    (json_request({"prompt": "x", "parameters": {"guidance_scale": "high"}}), 400, "guidance_scale must be a number"),
    (json_request({"prompt": "x", "parameters": {"steps": 2}}), 400, "unknown parameter(s) steps; known:"),
    (json_request({"prompt": "x", "parameters": {"strength": 0.5}}), 400, "strength applies to image-to-image"),
    (json_request({"prompt": "x", "image": "not base64!"}), 400, "'image' is not a base64 PNG or JPEG image"),
    (json_request({"prompt": "x", "image": _tiny_png(256)}), 400, "'image' is 256x256, over option.max_width=128"),
    (json_request({"prompt": ""}), 400, "'prompt' must be a non-empty string"),
    (json_request({"inputs": "x"}), 400, "unknown field(s) inputs"),
    (json_request(["x"]), 400, "the body must be a JSON object"),
    (Request(b"\xff", "text/plain"), 400, "the body is not UTF-8 text"),
    (Request(b"x", "image/png"), 415, "cannot read Content-Type image/png; send application/json or text/plain"),
    (json_request({"prompt": "x"}, accept="image/jpeg"), 406, "cannot answer Accept: image/jpeg"),
])
def test_a_bad_or_over_limit_request_is_refused_before_it_runs(sd, monkeypatch, request_, code, message) -> None:
    service = sd["service"]
    monkeypatch.setattr(service, "run", lambda job: pytest.fail("a refused request ran"))
    (answer,) = service.answer([request_])
    assert isinstance(answer, RequestError) and answer.code == code
    assert message in one_line(answer)


def test_kernel_injection_is_chosen_where_deepspeed_supports_the_pipeline(diff, sd, monkeypatch) -> None:
    # The decision only (injecting needs a GPU): the tiny pipeline is Stable Diffusion-shaped; a UNet with
    # added conditioning (as SDXL's) is not something DeepSpeed's UNet wrapper passes on.
    on_gpu = diff.Service({"model_id": sd["dir"], "dtype": "fp16", "kernel_injection": "true"}, cuda=True)
    pipe = sd["service"].pipe
    assert on_gpu._inject(pipe) is True
    monkeypatch.setitem(pipe.unet.config, "addition_embed_type", "text_time")
    with pytest.raises(OptionError) as err:
        on_gpu._inject(pipe)
    assert "option.kernel_injection=true: DeepSpeed's UNet wrapper drops" in one_line(err.value)
    auto = diff.Service({"model_id": sd["dir"], "dtype": "fp16"}, cuda=True)
    assert auto._inject(pipe) is False
    assert diff.Service({"model_id": sd["dir"]}, cuda=False)._inject(pipe) is False


def test_the_djl_glue_dispatches_to_the_ways(accel, diff, tiny, sd, monkeypatch) -> None:
    import lmi_deepspeed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the glue sets them for its ranks: restored afterwards
        monkeypatch.setenv(name, "0" if name != "WORLD_SIZE" else "1")
    service = lmi_deepspeed.start({"model_id": tiny["dir"], "partition": "accelerate", "engine": "Python"})
    assert isinstance(service, accel.Service) and _ask(service) == tiny["reference"]
    pipeline = lmi_deepspeed.start({"model_id": sd["dir"], "partition": "accelerate", "max_inference_steps": "2"})
    assert isinstance(pipeline, diff.Service)
    (png,) = pipeline.answer([Request(b"a cat", "text/plain")])
    assert png.content_type == "image/png"
