"""The handler's Accelerate and Diffusion ways on CPU, on the tiny models of the tests:
cold load time (a fresh process: imports, planning the device map, reading the weights) and request
latency, for
- Accelerate with the whole model in memory, and with the second decoder layer and the head offloaded to
  the disk (what a too-small max_memory does);
- Diffusion: a tiny random Stable Diffusion pipeline, 64x64 PNG, text-to-image and image-to-image.
Writes its section of bench/results.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE_CODE = ROOT / "buildkit" / "resources" / "image"  # the in-image modules, imported flat as the image does
sys.path[1:1] = [str(IMAGE_CODE), str(ROOT / "buildkit" / "resources" / "check")]

from bench.results_md import write_section  # noqa: E402

MARKER = "## Accelerate and Diffusion ways"
ROUNDS = 5
NEW_TOKENS = 32
STEPS = 10

RUN = textwrap.dedent("""
    import base64, json, sys, time
    sys.path.insert(0, {buildkit!r})
    t0 = time.monotonic()
    import {module} as way
    from lmi_deepspeed import Request
    service = way.Service({props!r}, cuda=False).load()
    load = time.monotonic() - t0
    requests = [Request(json.dumps(body).encode(), "application/json") for body in {bodies!r}]
    if {img2img!r}:  # image-to-image from the service's own first answer
        first = service.answer(requests[:1])[0]
        body = dict({bodies!r}[0], image=base64.b64encode(first.body).decode())
        body["parameters"] = dict(body["parameters"], strength=0.6)
        requests = [Request(json.dumps(body).encode(), "application/json")]
    service.answer(requests)  # warm-up
    times = []
    for _ in range({rounds}):
        t = time.monotonic()
        answers = service.answer(requests)
        times.append(time.monotonic() - t)
        assert not any(isinstance(a, Exception) for a in answers), answers
    print("RESULT " + json.dumps({{"load": load, "times": times}}), flush=True)
""")


def run(module: str, props: dict, bodies: list, img2img: bool = False) -> dict:
    script = RUN.format(buildkit=str(IMAGE_CODE), module=module, props=props, bodies=bodies, img2img=img2img,
                        rounds=ROUNDS)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or not line:
        raise SystemExit(f"{module} failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    return json.loads(line[7:])


def main() -> None:
    import lmi_check
    import lmi_diffusion
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model = lmi_check.make_tiny_model(str(Path(tmp) / "model"))
        pipe = lmi_diffusion.make_tiny_pipeline(str(Path(tmp) / "pipe"))
        with init_empty_weights():
            sizes = compute_module_sizes(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)))
        budget = sizes["model.embed_tokens"] + 2 * sizes["model.layers.0"] + 1024  # as tests/test_ways.py
        lm = [{"inputs": ["hello world", "the cat sat on the mat"], "parameters": {"max_new_tokens": NEW_TOKENS}}]
        sd = [{"prompt": "a red cat", "parameters": {"num_inference_steps": STEPS, "seed": 1}}]
        ways = [
            ("Accelerate, all in memory (`device_map=auto`)", f"2 prompts x {NEW_TOKENS} new tokens",
             run("lmi_accelerate", {"model_id": model}, lm)),
            ("Accelerate, layer 1 and the head offloaded to disk (`max_memory`)", f"2 prompts x {NEW_TOKENS} "
             "new tokens", run("lmi_accelerate", {"model_id": model, "max_memory": json.dumps({"cpu": budget}),
                                                  "offload_folder": str(Path(tmp) / "off")}, lm)),
            ("Diffusion, text-to-image", f"64x64 PNG, {STEPS} steps", run("lmi_diffusion", {"model_id": pipe}, sd)),
            ("Diffusion, image-to-image (strength 0.6)", f"64x64 PNG, {int(STEPS * 0.6)} of {STEPS} steps",
             run("lmi_diffusion", {"model_id": pipe}, sd, img2img=True)),
        ]
    lines = [MARKER + " (CPU)", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `python bench/ways_bench.py` on this machine "
             "(2 cores, shared), torch 2.13 CPU, Transformers 4.57.3, Accelerate 1.11.0, Diffusers 0.35.2, fp32. "
             "Models: the tiny Llama of the tests (2 layers, hidden 64) and the tiny random Stable Diffusion "
             "pipeline of `lmi_diffusion.make_tiny_pipeline` (UNet 32/64 channels, 2-layer CLIP text encoder, "
             f"VAE). Load: a fresh process, imports included. Latency: median and best of {ROUNDS} after a "
             f"warm-up; 1-minute load average at the end: {os.getloadavg()[0]:.1f}.", "",
             "| way | request | load | latency (median) | latency (best) |", "|---|---|---|---|---|"]
    for name, request, r in ways:
        lines.append(f"| {name} | {request} | {r['load']:.1f} s | {statistics.median(r['times']):.3f} s | "
                     f"{min(r['times']):.3f} s |")
    kb = {n: (IMAGE_CODE / f"{n}.py").stat().st_size / 1e3 for n in ("lmi_accelerate", "lmi_diffusion")}
    lines += ["", "With a load average above the 2 cores, the processes shared them with others: the times are "
                  "inflated and only roughly comparable between ways.", "",
              "Disk offload reads the offloaded weights from the checkpoint at every forward pass: it trades "
                  "speed for fitting a model at all. What the two ways add to an image: "
                  f"lmi_accelerate.py {kb['lmi_accelerate']:.0f} kB and lmi_diffusion.py {kb['lmi_diffusion']:.0f} "
                  "kB; Accelerate and Diffusers are already in every image."]
    section = "\n".join(lines) + "\n"
    write_section(MARKER, section)
    print(section)


if __name__ == "__main__":
    main()
