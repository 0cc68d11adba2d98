"""Time to first answer for a ~1 GB model (issue #29): the image's entrypoint beside plain Transformers, in one run.

The bench makes a random Llama-like model of ~1 GB (fp32, the character tokenizer of the tests, no hub) saved
as safetensors, then, each round and in turn:
- plain Transformers: `docker run --entrypoint python IMAGE -c …`, one process that imports Transformers,
  `from_pretrained`s the model and answers one greedy `generate`;
- the image as SageMaker starts it: `docker run IMAGE serve` with the model at /opt/ml/model (DeepSpeed way,
  tp=1, as the image's default entry point and `serving.properties` say), polled on `GET /ping` until 200,
  then one `POST /invocations` with the same prompt and token count.
Both run in the same image (the same Python, torch and Transformers), on the same page-cached model file,
timed from `docker run` on the host's clock. For the served image, the container's log lines (with the
engine's timestamps) say where the time goes: the container start, the DJL stand-in's start, its worker
start, the handler's load and the first request. Writes its section of bench/results.md.

Needs the local CPU image: `make build INSTANCE=cpu MATRIX=tests/matrix.local.yaml` (its alias
lmi-local:djl0.32-cpu is the default --image).
"""

from __future__ import annotations

import argparse
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

MARKER = "## Time to first answer"
PROMPT = "hello world"
NEW_TOKENS = 8
# ~1.03 GB of fp32 weights: 5 decoder layers of hidden 2048 (MLP 5632, 16 heads); the vocabulary is the
# tests' character tokenizer's, so every generated id decodes.
LAYERS, HIDDEN, MLP, HEADS = 5, 2048, 5632, 16
SERVING_PROPERTIES = f"engine=Python\noption.max_new_tokens={NEW_TOKENS * 4}\n"
# Milestones in the served container's log: (label, text that first marks it).
# DeepSpeed logs its accelerator choice as it is imported, and Transformers' from_pretrained warns about
# `torch_dtype` as it starts: they split the worker's time into importing torch + DeepSpeed, what comes before
# from_pretrained (Transformers' imports, config, tokenizer), and loading the weights + init_inference. A mark
# that a version does not print is left out.
MILESTONES = (("the DJL stand-in started", "stand-in; engine="), ("its worker started", "starting 1 rank(s)"),
              ("torch + DeepSpeed imported (DeepSpeed's accelerator log)", "Setting accelerator to"),
              ("from_pretrained called (its `torch_dtype` warning)", "`torch_dtype` is deprecated"),
              ("ready (model loaded, init_inference done)", "model loaded on"))

PLAIN = """
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
print("RESULT " + json.dumps({"times": t, "text": text}), flush=True)
""".replace("PROMPT", repr(PROMPT)).replace("NEW_TOKENS", str(NEW_TOKENS))


def docker(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([engine.detect_client().path, *args], capture_output=True, text=True, timeout=timeout)


def make_model(path: Path) -> int:
    """The ~1 GB random model, saved as safetensors, readable by the image's user (uid 1001)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    lmi_check.make_tiny_model(str(path))  # its character tokenizer; the model is replaced below
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    (path / "serving.properties").write_text(SERVING_PROPERTIES)
    path.chmod(0o755)
    for file in path.iterdir():
        file.chmod(0o644)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def plain(image: str, model: Path) -> dict:
    start = time.time()
    run = docker("run", "--rm", "--network", "none", "-v", f"{model}:/opt/ml/model:ro", "--entrypoint", "python",
                 image, "-c", PLAIN)
    end = time.time()
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if run.returncode or not line:
        raise SystemExit(f"plain Transformers failed in {image}:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    result = json.loads(line[7:])
    t = result["times"]
    return {"total": t["answered"] - start, "exit": end - start, "text": result["text"],
            "phases": {"container start to Python": t["start"] - start, "imports": t["imported"] - t["start"],
                       "from_pretrained": t["loaded"] - t["imported"], "generate": t["answered"] - t["loaded"]}}


def served(image: str, model: Path, logs: Path) -> dict:
    start = time.time()
    run = docker("run", "-d", "--network", "none", "-v", f"{model}:/opt/ml/model:ro", image, "serve")
    if run.returncode:
        raise SystemExit(f"docker run {image} serve failed: {run.stderr[-1000:]}")
    container = run.stdout.strip()
    try:
        ping = None
        while time.time() - start < 900:
            probe = docker("exec", container, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                           "http://127.0.0.1:8080/ping")
            if probe.stdout.strip() == "200":
                ping = time.time() - start
                break
            if "is not running" in probe.stderr:
                break
            time.sleep(0.2)
        if ping is None:
            raise SystemExit(f"{image} never answered /ping:\n{docker('logs', container).stderr[-3000:]}")
        body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS}})
        answer = docker("exec", container, "curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
                        "-d", body, "http://127.0.0.1:8080/invocations")
        first = time.time() - start
        text = json.loads(answer.stdout)["generated_text"]
        started = docker("inspect", "-f", "{{.State.StartedAt}}", container).stdout.strip()
        log = docker("logs", "-t", container)
        logs.write_text(log.stdout + log.stderr)
    finally:
        docker("rm", "-f", container)
    stamps = {}
    for line in (log.stdout + log.stderr).splitlines():
        stamp, _, text_ = line.partition(" ")
        for label, mark in MILESTONES:
            if mark in text_ and label not in stamps:
                stamps[label] = _epoch(stamp) - start
    ordered = dict(sorted(stamps.items(), key=lambda kv: kv[1]))  # stdout and stderr lines come apart
    return {"ping": ping, "total": first, "text": text,
            "phases": {"docker run to the container's start": _epoch(started) - start, **ordered}}


def _epoch(rfc3339: str) -> float:
    """Docker's RFC 3339 timestamp (nanoseconds, Z) as seconds since the epoch."""
    whole, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp() + float(
        f"0.{frac or 0}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="lmi-local:djl0.32-cpu", help="the image to start (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both, in turn (default: %(default)s)")
    args = parser.parse_args()
    engine.sdk()
    if docker("image", "inspect", args.image).returncode:
        print(f"error: image {args.image} not found; build it first: make build INSTANCE=cpu "
              "MATRIX=tests/matrix.local.yaml (or pass --image)", file=sys.stderr)
        raise SystemExit(2)
    logs = ROOT / ".lmi" / "cold-start"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmi-cold-") as tmp:
        model = Path(tmp) / "model"
        size = make_model(model)
        plain(args.image, model)  # warm-up: the model file in the page cache, the image's layers read once
        rounds = []
        for i in range(args.rounds):
            rounds.append((plain(args.image, model), served(args.image, model, logs / f"served-{i}.log")))
        shutil.rmtree(model)
    load = os.getloadavg()[0]
    plains = [p["total"] for p, _ in rounds]
    serves = [s["total"] for _, s in rounds]
    pings = [s["ping"] for _, s in rounds]
    same = all(p["text"] == s["text"] for p, s in rounds)
    best = min(range(len(rounds)), key=lambda i: serves[i])
    lines = [MARKER + " (issue #29, CPU, tp=1)", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `make bench-cold-start` (bench/cold_start_bench.py) "
             f"on this machine ({os.cpu_count()} cores, shared), image `{args.image}`. Model: a random Llama "
             f"({LAYERS} layers, hidden {HIDDEN}, MLP {MLP}, {HEADS} heads, the tests' character tokenizer), "
             f"fp32, {size / 1e9:.2f} GB of safetensors, page-cached. One request: {PROMPT!r}, {NEW_TOKENS} new "
             f"tokens, greedy. Times from `docker run` on the host. {len(rounds)} round(s) after a warm-up, "
             f"the two in turn; 1-minute load average at the end: {load:.1f}.", "",
             "| what | median | runs |", "|---|---|---|",
             f"| plain Transformers in the image (`from_pretrained` + one `generate`), to its answer | "
             f"{statistics.median(plains):.1f} s | {', '.join(f'{x:.1f}' for x in plains)} |",
             f"| the image's entrypoint (`serve`, DeepSpeed way, tp=1): `/ping` 200 | {statistics.median(pings):.1f} s "
             f"| {', '.join(f'{x:.1f}' for x in pings)} |",
             f"| the image's entrypoint: first answer | {statistics.median(serves):.1f} s | "
             f"{', '.join(f'{x:.1f}' for x in serves)} |",
             f"| ratio, first answer / plain Transformers (goal <= 1.2) | "
             f"{statistics.median(serves) / statistics.median(plains):.2f} | |",
             "", f"The same continuation from both: {'yes' if same else 'NO'}. Where the time goes (round {best + 1}, "
             "seconds since `docker run`; the served image's from its log's timestamps):", "",
             "| plain Transformers | s | served image | s |", "|---|---|---|---|"]
    p, s = rounds[best]
    left = list(p["phases"].items()) + [("answered", p["total"])]
    right = list(s["phases"].items()) + [("`/ping` 200", s["ping"]), ("first answer", s["total"])]
    cumulative, acc = [], 0.0
    for name, seconds in left:  # plain's phases are durations: show when each ends
        acc = seconds if name == "answered" else acc + seconds
        cumulative.append((f"{name} done" if name != "answered" else name, acc))
    for i in range(max(len(cumulative), len(right))):
        a = cumulative[i] if i < len(cumulative) else ("", None)
        b = right[i] if i < len(right) else ("", None)
        lines.append(f"| {a[0]} | {'' if a[1] is None else f'{a[1]:.1f}'} | {b[0]} | "
                     f"{'' if b[1] is None else f'{b[1]:.1f}'} |")
    lines += ["", "`/ping` is polled by `docker exec … curl` every ~0.3 s (exec included), so the `/ping` time is "
              "up to that late; the first answer's request is sent right after. Not measured here: tp=2 (two ranks "
              "need two GPUs in MPI mode, or the stand-in's test-only GPU pretence), the Accelerate and Diffusion "
              "ways, and any GPU; the served logs are kept in .lmi/cold-start/."]
    section = "\n".join(lines) + "\n"
    write_section(MARKER, section)
    print(section)


if __name__ == "__main__":
    main()
