"""What a hostile request costs the handler (CPU, the tests' tiny models), before and after the bounds: the
handler as it is in this tree and as it was at a git revision (BEFORE, default the commit before the bounds),
side by side in one run. Each case runs in a fresh process that loads the model, then answers one request
through the DJL glue (`handle`, with the stand-in's djl_python Input): the time of that call and the growth of
the process's peak memory (ru_maxrss) over the loaded model. A watchdog ends a case past LIMIT_S seconds or
LIMIT_MIB of growth (shown as "killed"), so a hostile request cannot take the machine down here either.
Writes its section of bench/results.md.
"""

from __future__ import annotations

import json
import os
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

MARKER = "## Hostile requests (CPU)"
BEFORE = os.environ.get("BEFORE", "4609e9e")
LIMIT_S = float(os.environ.get("LIMIT_S", "60"))
LIMIT_MIB = float(os.environ.get("LIMIT_MIB", "4096"))
MODULES = ("lmi_deepspeed.py", "lmi_accelerate.py", "lmi_diffusion.py")

CHILD = textwrap.dedent("""
    import json, os, resource, sys, threading, time
    sys.path[:0] = [{code!r}, {standin!r}]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import lmi_deepspeed as handler
    from djl_python.inputs import Input

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def rss_mib():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    load = dict({props!r})
    handler.handle(Input(load, []))
    if handler._load_error:
        print(json.dumps({{"error": handler._load_error}})); sys.exit(0)
    {warm}
    properties, content = {request}
    base = peak_mib()
    start = time.monotonic()

    def watchdog():
        while True:
            time.sleep(0.05)
            if rss_mib() - base > {limit_mib} or time.monotonic() - start > {limit_s}:
                print(json.dumps({{"killed": True, "s": time.monotonic() - start,
                                  "mib": max(rss_mib(), peak_mib()) - base}}), flush=True)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        out = handler.handle(Input(properties, content))
    except Exception as exc:  # DJL answers a raising handler 424 (handler_exception)
        print(json.dumps({{"s": time.monotonic() - start, "mib": peak_mib() - base,
                          "code": "424 (raised " + type(exc).__name__ + ")"}}), flush=True)
        sys.exit(0)
    took = time.monotonic() - start
    body = out.content.value_at(0) if out is not None and out.content.pairs else b""
    print(json.dumps({{"s": took, "mib": peak_mib() - base, "code": out.code if out is not None else None,
                      "answer": body[:160].decode("utf-8", "replace")}}), flush=True)
""")


def body(inputs, **params) -> str:
    return json.dumps({"inputs": inputs, "parameters": params})


def cases(llm: str, sd: str) -> list[tuple[str, str, dict, str, str]]:
    """(name, way, load properties, the request as (properties, content) source, its bound)."""
    lm = {"model_id": llm, "tensor_parallel_degree": "1", "max_new_tokens": "64"}
    sdp = {"model_id": sd}
    js = {"Content-Type": "application/json"}
    return [
        ("a good request (12 new tokens)", "lm", lm,
         f"({js!r}, [('data', {body('hello world', max_new_tokens=12).encode()!r})])", "-"),
        ("a 50 MB prompt (JSON)", "lm", lm,
         f"({js!r}, [('data', json.dumps({{'inputs': 'a' * 50_000_000}}).encode())])", "max_body_bytes"),
        ("a 1M-character prompt (text/plain)", "lm", lm,
         "({'Content-Type': 'text/plain'}, [('data', b'a' * 1_000_000)])", "max_body_bytes"),
        ("a 100k-character prompt (JSON)", "lm", lm,
         f"({js!r}, [('data', json.dumps({{'inputs': 'a' * 100_000}}).encode())])", "max_prompt_chars"),
        ("a prompt over the model's positions", "lm", lm,
         f"({js!r}, [('data', {body('a' * 120, max_new_tokens=64).encode()!r})])", "positions"),
        ("a body nested 100,000 deep", "lm", lm,
         f"({js!r}, [('data', b'[' * 100_000 + b']' * 100_000)])", "max_body_depth"),
        ("a batch_size header of 5,000,000", "lm", lm,
         f"({{**{js!r}, 'batch_size': '5000000'}}, [('data', {body('hello world', max_new_tokens=12).encode()!r})])",
         "DJL's batch keys"),
        ("diffusion: a good request (64x64, 2 steps)", "sd", sdp,
         "({'Content-Type': 'application/json'}, [('data', json.dumps({'prompt': 'a cat', 'parameters': "
         "{'num_inference_steps': 2, 'seed': 1}}).encode())])", "-"),
        ("diffusion: 1024x1024, 1 step (the old CPU default bound)", "sd", sdp,
         "({'Content-Type': 'application/json'}, [('data', json.dumps({'prompt': 'a cat', 'parameters': "
         "{'num_inference_steps': 1, 'height': 1024, 'width': 1024}}).encode())])", "max_height, max_pixel_steps"),
        ("diffusion: a 10 MB negative_prompt", "sd", sdp,
         "({'Content-Type': 'application/json'}, [('data', json.dumps({'prompt': 'a cat', 'parameters': "
         "{'num_inference_steps': 1, 'negative_prompt': 'b' * 10_000_000}}).encode())])", "max_prompt_chars"),
    ]


def run_case(code: str, props: dict, request: str, warm: str) -> dict:
    script = CHILD.format(code=code, standin=str(ROOT / "tests" / "local" / "standin"), props=props,
                          request=request, warm=warm, limit_s=LIMIT_S, limit_mib=LIMIT_MIB)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=LIMIT_S + 600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def cell(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    if r.get("killed"):
        return f"killed at {r['s']:.1f} s, +{r['mib']:.0f} MiB"
    return f"{r['code']} in {r['s']:.2f} s, +{r['mib']:.0f} MiB"


def main() -> None:
    import lmi_check
    import lmi_diffusion

    work = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    llm = lmi_check.make_tiny_model(str(work / "llm"))
    sd = lmi_diffusion.make_tiny_pipeline(str(work / "sd"))
    trees = {"after": str(IMAGE_CODE), "before": str(work / "before")}
    os.makedirs(trees["before"])
    for name in MODULES:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:buildkit/{name}"], check=True,
                              capture_output=True, text=True).stdout
        Path(trees["before"], name).write_text(text)
    rows = []
    for name, way, props, request, bound in cases(llm, sd):
        warm = ("handler.handle(Input({'Content-Type': 'application/json'}, [('data', b'{\"inputs\": \"hi\", "
                "\"parameters\": {\"max_new_tokens\": 2}}')]))" if way == "lm" else
                "handler.handle(Input({'Content-Type': 'application/json'}, [('data', b'{\"prompt\": \"hi\", "
                "\"parameters\": {\"num_inference_steps\": 1, \"seed\": 0}}')]))")
        results = {tree: run_case(path, props, request, warm) for tree, path in trees.items()}
        rows.append((name, bound, results["before"], results["after"]))
        print(f"{name}: before {cell(results['before'])} | after {cell(results['after'])}", flush=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [MARKER, "",
             f"Measured {when} by `make bench-hostile` (bench/hostile_bench.py) on x86_64, {os.cpu_count()} cores, "
             f"Python {sys.version.split()[0]}, one rank, CPU, the tests' tiny Llama (128 positions) and tiny Stable "
             f"Diffusion pipeline; before = the handler at {BEFORE}, after = this tree, side by side in one run. "
             "Each cell: the answer's status, the time of the one `handle` call, and the growth of the process's "
             f"peak memory over the loaded and warmed model; a case past {LIMIT_S:.0f} s or {LIMIT_MIB:.0f} MiB "
             "of growth is killed by the bench's watchdog.", "",
             "| request | bound that refuses it | before | after |", "|---|---|---|---|"]
    lines += [f"| {n} | {b} | {cell(x)} | {cell(y)} |" for n, b, x, y in rows]
    write_section(MARKER, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
