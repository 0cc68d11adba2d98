"""Time to first answer through the image's entrypoint, per way, beside plain Transformers/Diffusers, in one run.

The bench makes two random models, saved as safetensors (no hub):
- a Llama-like causal LM of ~1 GB (fp32, the character tokenizer of the tests);
- a larger Stable Diffusion pipeline than the tests' tiny one (UNet, CLIP text encoder, VAE; ~0.7 GB fp32).
Each way gets a model directory of its own: hard links to the same files and its own serving.properties.
Each round, in turn:
- plain Transformers: `docker run --entrypoint python IMAGE -c …`, one process that imports Transformers,
  `from_pretrained`s the LM and answers one greedy `generate` (plain Diffusers: `DiffusionPipeline.
  from_pretrained` and one image with the same prompt, seed, size and steps as the request);
- the image as SageMaker starts it: `docker run IMAGE serve` with the way's directory at /opt/ml/model, polled
  on `GET /ping` every 50 ms from inside the container (one `docker exec` for the whole wait), then one
  `POST /invocations` with the same prompt; for each way:
    DeepSpeed tp=1   the default entry point, engine=Python (one process: what DJL runs without a GPU);
    DeepSpeed tp=2   engine=MPI, option.tensor_parallel_degree=2: two ranks under mpirun (CPU gloo ranks, with
                     the stand-in's test-only GPU pretence DJL_STANDIN_GPUS=2, since DJL runs MPI mode only
                     where GPUs are);
    Accelerate       option.partition=accelerate (one process, Accelerate's device map: all on the CPU);
    Diffusion        the pipeline directory (model_index.json).
All in the same image (the same Python, torch, Transformers, Diffusers), on page-cached files, timed from
`docker run` on the host's clock (the container's `date` is the host's). With --before IMAGE, the served ways
also run on an earlier build of the image in the same rounds, so before/after ratios come from one run.
For DeepSpeed tp=1, the container's log lines (with the engine's timestamps) say where the time goes.
Writes its section of bench/results.md.

Needs the local CPU image: `make build INSTANCE=cpu MATRIX=tests/matrix.local.yaml` (its alias
lmi-local:djl0.32-cpu is the default --image).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE_CODE = ROOT / "buildkit" / "resources" / "image"  # the in-image modules, imported flat as the image does
sys.path[1:1] = [str(IMAGE_CODE), str(ROOT / "buildkit" / "resources" / "check")]

import lmi_check  # noqa: E402

from bench.results_md import write_section  # noqa: E402
from buildkit import engine  # noqa: E402

MARKER = "## Time to first answer per way"
PROMPT = "hello world"
NEW_TOKENS = 8
# ~1.03 GB of fp32 weights: 5 decoder layers of hidden 2048 (MLP 5632, 16 heads); the vocabulary is the
# tests' character tokenizer's, so every generated id decodes.
LAYERS, HIDDEN, MLP, HEADS = 5, 2048, 5632, 16
# The diffusion request: a small image in two steps, so that the load, not the drawing, is what is timed.
IMAGE_PARAMS = {"num_inference_steps": 2, "height": 128, "width": 128, "seed": 0}
LM_WAYS = {  # way -> (serving.properties, extra `docker run` environment)
    "DeepSpeed tp=1": (f"engine=Python\noption.max_new_tokens={NEW_TOKENS * 4}\n", {}),
    "DeepSpeed tp=2": (f"engine=MPI\noption.tensor_parallel_degree=2\noption.max_new_tokens={NEW_TOKENS * 4}\n",
                       {"DJL_STANDIN_GPUS": "2"}),
    "Accelerate": (f"engine=Python\noption.partition=accelerate\noption.max_new_tokens={NEW_TOKENS * 4}\n", {}),
}
DIFFUSION = "Diffusion"
# Milestones in the served container's log: (label, text that first marks it). DeepSpeed logs its accelerator
# choice as it is imported (where the handler imports it), and Transformers' from_pretrained warns about
# `torch_dtype` as it starts. A mark that a run does not print is left out.
MILESTONES = (("the DJL stand-in started", "stand-in; engine="), ("its worker(s) started", " rank(s)"),
              ("DeepSpeed imported (its accelerator log)", "Setting accelerator to"),
              ("from_pretrained called (its `torch_dtype` warning)", "`torch_dtype` is deprecated"),
              ("DeepSpeed's shm all-reduce op JIT-compiled (CPU ranks)", "deepspeed_shm_comm_op built"),
              ("ready (model loaded)", "model loaded on"))

PLAIN_LM = """
import json, time
t = {"start": time.time()}
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t["imported"] = time.time()
tokenizer = AutoTokenizer.from_pretrained("/opt/ml/model")
model = AutoModelForCausalLM.from_pretrained("/opt/ml/model", torch_dtype=torch.float32).eval()
t["loaded"] = time.time()
ids = tokenizer(PROMPT, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
t["answered"] = time.time()
print("RESULT " + json.dumps({"times": t, "answer": text}), flush=True)
""".replace("PROMPT", repr(PROMPT)).replace("NEW_TOKENS", str(NEW_TOKENS))

PLAIN_DIFFUSION = """
import hashlib, io, json, time
t = {"start": time.time()}
import torch
from diffusers import DiffusionPipeline
t["imported"] = time.time()
pipe = DiffusionPipeline.from_pretrained("/opt/ml/model", torch_dtype=torch.float32, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
t["loaded"] = time.time()
params = PARAMS
seed = params.pop("seed")
image = pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **params).images[0]
out = io.BytesIO()
image.save(out, format="PNG")
t["answered"] = time.time()
print("RESULT " + json.dumps({"times": t, "answer": hashlib.sha256(out.getvalue()).hexdigest()}), flush=True)
""".replace("PROMPT", repr(PROMPT)).replace("PARAMS", repr(IMAGE_PARAMS))

# The wait and the request, in one `docker exec`: /ping every 50 ms until 200, then one POST; prints when each
# came (the host's clock) and the answer in base64.
CLIENT = """
until curl -sf -o /dev/null http://127.0.0.1:8080/ping; do sleep 0.05; done
date +%s.%N
curl -sS -o /tmp/answer -X POST -H 'Content-Type: application/json' -H "Accept: $ACCEPT" --data-binary "$BODY" \
  http://127.0.0.1:8080/invocations
date +%s.%N
base64 -w0 /tmp/answer
"""


def docker(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([engine.detect_client().path, *args], capture_output=True, text=True, timeout=timeout)


def make_model(path: Path) -> int:
    """The ~1 GB random LM, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    lmi_check.make_tiny_model(str(path))  # its character tokenizer; the model is replaced below
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def make_pipeline(path: Path) -> int:
    """A random Stable Diffusion pipeline larger than the tests' (UNet with SD's layout at 0.4 of its widths, a
    6-layer CLIP text encoder of 512, a 4-level VAE), saved as safetensors; the tests' byte-level tokenizer."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from buildkit import lmi_diffusion

    lmi_diffusion.make_tiny_pipeline(str(path))  # its tokenizer, scheduler and index; the models are replaced
    torch.manual_seed(0)
    vocab = json.loads((path / "text_encoder" / "config.json").read_text())["vocab_size"]
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                 num_attention_heads=8, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(path / "text_encoder", safe_serialization=True)
    UNet2DConditionModel(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=16,
                         in_channels=4, out_channels=4, cross_attention_dim=512, attention_head_dim=8,
                         ).save_pretrained(path / "unet", safe_serialization=True)
    AutoencoderKL(block_out_channels=(64, 128, 256, 256), in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  ).save_pretrained(path / "vae", safe_serialization=True)
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def way_dir(source: Path, target: Path, properties: str) -> Path:
    """A model directory of hard links to `source`'s files, with its own serving.properties; readable by the
    image's user (uid 1001)."""
    for file in source.rglob("*"):
        dest = target / file.relative_to(source)
        if file.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(file, dest)
    (target / "serving.properties").write_text(properties)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def plain(image: str, model: Path, script: str) -> dict:
    start = time.time()
    run = docker("run", "--rm", "--network", "none", "-v", f"{model}:/opt/ml/model:ro", "--entrypoint", "python",
                 image, "-c", script)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if run.returncode or not line:
        raise SystemExit(f"plain run failed in {image}:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    result = json.loads(line[7:])
    t = result["times"]
    return {"total": t["answered"] - start, "answer": result["answer"],
            "phases": {"container start to Python": t["start"] - start, "imports": t["imported"] - t["start"],
                       "from_pretrained": t["loaded"] - t["imported"], "generate": t["answered"] - t["loaded"]}}


def served(image: str, model: Path, env: dict, diffusion: bool, log_path: Path) -> dict:
    body = (json.dumps({"prompt": PROMPT, "parameters": IMAGE_PARAMS}) if diffusion else
            json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS}}))
    env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    start = time.time()
    run = docker("run", "-d", "--network", "none", *env_args, "-v", f"{model}:/opt/ml/model:ro", image, "serve")
    if run.returncode:
        raise SystemExit(f"docker run {image} serve failed: {run.stderr[-1000:]}")
    container = run.stdout.strip()
    try:
        client = docker("exec", "-e", f"BODY={body}", "-e", f"ACCEPT={'image/png' if diffusion else '*/*'}",
                        container, "timeout", "900", "sh", "-c", CLIENT)
        started = docker("inspect", "-f", "{{.State.StartedAt}}", container).stdout.strip()
        log = docker("logs", "-t", container)
        log_path.write_text(log.stdout + log.stderr)
        lines = client.stdout.split("\n")
        if client.returncode or len(lines) < 3:
            raise SystemExit(f"{image} ({model.name}) never answered:\n{client.stderr[-1000:]}"
                             f"{(log.stdout + log.stderr)[-3000:]}")
    finally:
        docker("rm", "-f", container)
    data = base64.b64decode(lines[2])
    answer = hashlib.sha256(data).hexdigest() if diffusion else json.loads(data)["generated_text"]
    stamps = {}
    for line in (log.stdout + log.stderr).splitlines():
        stamp, _, text = line.partition(" ")
        for label, mark in MILESTONES:
            if mark in text and label not in stamps:
                stamps[label] = _epoch(stamp) - start
    ordered = dict(sorted(stamps.items(), key=lambda kv: kv[1]))  # stdout and stderr lines come apart
    return {"ping": float(lines[0]) - start, "total": float(lines[1]) - start, "answer": answer,
            "phases": {"docker run to the container's start": _epoch(started) - start, **ordered}}


def _epoch(rfc3339: str) -> float:
    """Docker's RFC 3339 timestamp (nanoseconds, Z) as seconds since the epoch."""
    whole, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp() + float(
        f"0.{frac or 0}")


def _ratio(served_runs: list, plain_runs: list) -> float:
    """The median over the rounds of served / plain of the same round."""
    return statistics.median(s["total"] / p["total"] for s, p in zip(served_runs, plain_runs, strict=True))


def _runs(values: list) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="lmi-local:djl0.32-cpu", help="the image to start (default: %(default)s)")
    parser.add_argument("--before", metavar="IMAGE", help="an earlier build of the image, served in the same rounds")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every run, in turn (default: %(default)s)")
    parser.add_argument("--ways", default=",".join([*LM_WAYS, DIFFUSION]),
                        help="comma-separated ways to serve (default: all: %(default)s)")
    args = parser.parse_args()
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = sorted(set(ways) - {*LM_WAYS, DIFFUSION})
    if unknown:
        print(f"error: unknown way(s) {', '.join(unknown)}; choose from {', '.join([*LM_WAYS, DIFFUSION])}",
              file=sys.stderr)
        raise SystemExit(2)
    engine.sdk()
    images = {"after": args.image, **({"before": args.before} if args.before else {})}
    for image in images.values():
        if docker("image", "inspect", image).returncode:
            print(f"error: image {image} not found; build it first: make build INSTANCE=cpu "
                  "MATRIX=tests/matrix.local.yaml (or pass --image)", file=sys.stderr)
            raise SystemExit(2)
    logs = ROOT / ".lmi" / "cold-start"
    logs.mkdir(parents=True, exist_ok=True)
    lm_ways = [w for w in ways if w in LM_WAYS]
    results: dict = {}  # (kind, way) -> [run, ...]; kind: "plain" or an image's key
    with tempfile.TemporaryDirectory(prefix="lmi-cold-") as tmp:
        tmp = Path(tmp)
        sizes = {}
        dirs = {}
        if lm_ways:
            sizes["lm"] = make_model(tmp / "lm")
            for way in lm_ways:
                dirs[way] = way_dir(tmp / "lm", tmp / way.replace(" ", "-").replace("=", ""), LM_WAYS[way][0])
            plain(args.image, dirs[lm_ways[0]], PLAIN_LM)  # warm-up: the files page-cached, the layers read once
        if DIFFUSION in ways:
            sizes["pipeline"] = make_pipeline(tmp / "pipeline")
            dirs[DIFFUSION] = way_dir(tmp / "pipeline", tmp / "diffusion", "engine=Python\n")
            plain(args.image, dirs[DIFFUSION], PLAIN_DIFFUSION)
        for i in range(args.rounds):
            if lm_ways:
                results.setdefault(("plain", "lm"), []).append(plain(args.image, dirs[lm_ways[0]], PLAIN_LM))
            for way in lm_ways:
                for key, image in images.items():
                    results.setdefault((key, way), []).append(served(
                        image, dirs[way], LM_WAYS[way][1], False, logs / f"{key}-{way.replace(' ', '-')}-{i}.log"))
            if DIFFUSION in ways:
                results.setdefault(("plain", DIFFUSION), []).append(plain(args.image, dirs[DIFFUSION],
                                                                          PLAIN_DIFFUSION))
                for key, image in images.items():
                    results.setdefault((key, DIFFUSION), []).append(served(
                        image, dirs[DIFFUSION], {}, True, logs / f"{key}-diffusion-{i}.log"))
        shutil.rmtree(tmp / "lm", ignore_errors=True)
    load = os.getloadavg()[0]
    section = report(args, images, ways, results, sizes, load)
    write_section(MARKER, section)
    print(section)


def report(args, images: dict, ways: list, results: dict, sizes: dict, load: float) -> str:
    med = statistics.median
    model = []
    if "lm" in sizes:
        model.append(f"a random Llama ({LAYERS} layers, hidden {HIDDEN}, MLP {MLP}, {HEADS} heads, the tests' "
                     f"character tokenizer), fp32, {sizes['lm'] / 1e9:.2f} GB of safetensors; one request "
                     f"{PROMPT!r}, {NEW_TOKENS} new tokens, greedy")
    if "pipeline" in sizes:
        model.append(f"a random Stable Diffusion pipeline (UNet 128-256-512-512, CLIP text encoder 6 x 512, VAE "
                     f"64-128-256-256), fp32, {sizes['pipeline'] / 1e9:.2f} GB of safetensors; one image "
                     f"{IMAGE_PARAMS['height']}x{IMAGE_PARAMS['width']}, {IMAGE_PARAMS['num_inference_steps']} "
                     "steps, seed 0")
    before = "before" in images
    beside = f" (after) beside `{images['before']}` (before)" if before else ""
    lines = [MARKER + " (CPU)", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `make bench-cold-start` "
             f"(bench/cold_start_bench.py{' --before IMAGE' if before else ''}) on this machine "
             f"({os.cpu_count()} cores, shared), image `{images['after']}`{beside}. "
             f"Models: {'; '.join(model)}; page-cached. Times from `docker run` on the host; {args.rounds} round(s) "
             f"after a warm-up, every run in turn; 1-minute load average at the end: {load:.1f}.", ""]
    head = "| way | plain (median) | " + ("served before: first answer | ratio before | " if before else "") + \
        "served: `/ping` 200 | served: first answer | ratio (goal <= 1.2 for tp=1) | same answer |"
    lines[-2] += (" A ratio is the median over the rounds of served / plain of the same round (the "
                                  "two ran back to back, under the same load).")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for way in ways:
        base = results[("plain", DIFFUSION if way == DIFFUSION else "lm")]
        p = med([r["total"] for r in base])
        after = results[("after", way)]
        a = med([r["total"] for r in after])
        same = all(r["answer"] == base[0]["answer"] for r in after + results.get(("before", way), []))
        row = f"| {way} | {p:.1f} s ({_runs([r['total'] for r in base])}) | "
        if before:
            runs = results[("before", way)]
            row += (f"{med([r['total'] for r in runs]):.1f} s ({_runs([r['total'] for r in runs])}) | "
                    f"{_ratio(runs, base):.2f} | ")
        row += (f"{med([r['ping'] for r in after]):.1f} s | {a:.1f} s ({_runs([r['total'] for r in after])}) | "
                f"{_ratio(after, base):.2f} | {'yes' if same else 'NO'} |")
        lines.append(row)
    first = "DeepSpeed tp=1"
    if first in ways:
        lines += ["", f"Where the time goes, {first} before and after, and the other ways after (the median "
                  "round of each; seconds since `docker run`; the served image's from its log's timestamps):", ""]
        cols = [("plain Transformers", None)] + [(f"served {k}", k) for k in images] + [
            (f"{w}, after", w) for w in ways if w != first]
        lines += ["| " + " | s | ".join(c for c, _ in cols) + " | s |", "|" + "---|" * (2 * len(cols))]
        columns = []
        plains = results[("plain", "lm")]
        p = sorted(plains, key=lambda r: r["total"])[len(plains) // 2]
        acc, rows = 0.0, []
        for name, seconds in p["phases"].items():
            acc += seconds
            rows.append((f"{name} done", acc))
        rows.append(("answered", p["total"]))
        columns.append(rows)
        for key, way in [(k, first) for k in images] + [("after", w) for w in ways if w != first]:
            runs = results[(key, way)]
            s = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
            columns.append(list(s["phases"].items()) + [("`/ping` 200", s["ping"]), ("first answer", s["total"])])
        for i in range(max(len(c) for c in columns)):
            cells = []
            for c in columns:
                name, value = c[i] if i < len(c) else ("", None)
                cells += [name, "" if value is None else f"{value:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Plain is one process in the same image (`--entrypoint python`); the served image runs "
              "the entrypoint, the DJL stand-in of tests/local/ (DJL Serving's Java side cannot be had here) and "
              "the handler. tp=2 runs two CPU ranks (gloo) against one plain process: each rank reads the whole "
              "model and partitions it, and a CPU image JIT-compiles DeepSpeed's shm all-reduce op at every start "
              "(it prebuilds no op). No GPU here: nothing is measured on one. The served logs are kept in "
              ".lmi/cold-start/."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
