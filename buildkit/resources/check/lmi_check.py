#!/usr/bin/env python3
"""lmi in-image checks: does this environment hold what its claims say?

Not part of any image: `lmi test` mounts it read-only into each test container (at
/opt/lmi-check/lmi_check.py), with the checks of the image's profile beside it
(/opt/lmi-check/<profile>_check.py; both from buildkit/resources/check/ in the toolkit), and runs it there, so
editing a check changes no image; or run it directly on a host (`python lmi_check.py ...`), e.g. on a GPU machine.
It needs nothing beyond the Python standard library and what the image itself carries. Its one name is lmi_check:
the host toolkit never imports it, and tests import it flat, as a profile's checks do.

    python lmi_check.py --claims /opt/lmi/image.json --profile /opt/lmi-check/<profile>_check.py \
        --checks checks.json [--timeout 300]

`--profile` loads a profile's check module, which registers its builtins with `import lmi_check` and
`@lmi_check.builtin(name, tier)` (`lmi_check` is this module, also when it runs as the script). A builtin named
`<dist>-version` that nobody registered compares the installed distribution <dist> with the version the claims
name under versions[<dist>] (the libraries of a matrix line, the engine's own packages).

`--checks` is a JSON list of check records, as `lmi test` generates them from the matrix:
    {"name": "torch-version", "tier": "cpu", "kind": "builtin"}
    {"name": "...", "tier": "cpu", "kind": "command", "command": "nproc", "expect": "^\\d+"}
    {"name": "...", "tier": "cpu", "kind": "file", "path": "/opt/ml/model", "exists": true, "contains": "..."}
Prints one JSON object per check on stdout ({"name", "tier", "passed", "message", "seconds"}); exits 0
when every check passed, 1 otherwise. Each check runs under a timeout: a check that hangs is stopped,
reported, and the remaining checks still run.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from importlib import metadata

# A profile's checks `import lmi_check`: run as a script, this module is __main__, and that import must find it
# rather than load a second copy with a registry of its own.
sys.modules.setdefault("lmi_check", sys.modules[__name__])

BUILTINS: dict[str, tuple[str, object]] = {}  # name -> (tier, function(claims) -> message)


class CheckFailed(Exception):
    pass


def builtin(name: str, tier: str):
    """Register a builtin check (`fn(claims) -> message`, raising CheckFailed); a name is registered once."""
    def register(fn):
        if name in BUILTINS and BUILTINS[name][1] is not fn:
            raise ValueError(f"builtin check {name} is registered twice ({BUILTINS[name][1].__module__}, "
                             f"{fn.__module__})")
        BUILTINS[name] = (tier, fn)
        return fn

    return register


def load_profile(path: str):
    """Load a profile's check module from a file; its builtins register themselves."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no profile check module at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _versions(claims: dict) -> dict:
    return claims.get("versions", {})


def _compare(what: str, expected: str | None, found: str | None) -> str:
    expect(found == expected, f"{what}: the matrix says {expected}, the image has {found}")
    return f"{what} {found}"


# --- cpu tier: claims ---------------------------------------------------------------------------------


@builtin("python-version", "cpu")
def python_version(claims):
    found = ".".join(platform.python_version().split(".")[:2])
    return _compare("Python", _versions(claims)["python"], found)


@builtin("torch-version", "cpu")
def torch_version(claims):
    return _compare("torch", _versions(claims)["torch"], metadata.version("torch").split("+")[0])


@builtin("torch-cuda", "cpu")
def torch_cuda(claims):
    import torch

    variant = claims.get("torch_variant", "cpu")
    want = None if variant == "cpu" else f"{variant[2:-1]}.{variant[-1]}"
    return _compare("torch.version.cuda", want, torch.version.cuda)


def library_version(dist: str):
    """`<dist>-version`: the installed distribution against the version the claims name for it."""
    def check(claims):
        want = _versions(claims).get(dist)
        expect(want is not None, f"the claims name no version of {dist}")
        return _compare(dist, want, metadata.version(dist))

    return check


@builtin("pip-check", "cpu")
def pip_check(claims):
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    expect(out.returncode == 0, "pip check: " + (out.stdout + out.stderr).strip()[:500])
    return "pip check: no broken requirements"


def tiny_model():
    """A 2-layer GPT-2 from a config (no hub) and a batch of token ids."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32)
    return GPT2LMHeadModel(config).eval(), torch.randint(0, 128, (2, 16))


TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?"


def make_tiny_model(path: str, seed: int = 0, heads: int = 8) -> str:
    """A tiny Llama with random weights and a character tokenizer, saved as a Transformers model
    directory: real loading code, no hub. 64 wide: `heads` heads of 64/heads (8 by default: one head per rank
    for tensor parallelism up to 8; fewer, wider heads where an attention kernel needs head sizes >= 32)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(TINY_ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>",
                                        model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def reference_generate(path: str, prompts: list, max_new_tokens: int) -> list:
    """Greedy continuations from plain Transformers: what a partitioned model must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


@builtin("tiny-forward", "cpu")
def tiny_forward(claims):
    import torch

    model, ids = tiny_model()  # built on the fly from a config: no hub download
    with torch.no_grad():
        logits = model(ids).logits
    expect(tuple(logits.shape) == (2, 16, 128), f"logits shape {tuple(logits.shape)}")
    expect(bool(torch.isfinite(logits).all()), "non-finite logits")
    return "a 2-layer GPT-2 from a config ran a forward pass on the CPU"


@builtin("cuda-compat-files", "cpu")
def cuda_compat_files(claims):
    libs = glob.glob("/usr/local/cuda/compat/libcuda.so.*")
    if claims.get("cuda_compat"):
        expect(bool(libs), "the spec needs cuda-compat, but /usr/local/cuda/compat has no libcuda")
        return f"cuda-compat present: {os.path.basename(sorted(libs)[-1])}"
    expect(not libs, f"cuda-compat present but not needed: {libs}")
    return "no cuda-compat, as the spec says"


# --- gpu tier -------------------------------------------------------------------------------------------


def _sm(claims) -> tuple[int, int]:
    major, minor = claims["sm"].split(".")
    return int(major), int(minor)


@builtin("nvidia-smi", "gpu")
def nvidia_smi(claims):
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
    expect(out.returncode == 0, f"nvidia-smi failed: {out.stderr.strip()[:300]}")
    return out.stdout.strip().replace("\n", "; ")


@builtin("cuda-available", "gpu")
def cuda_available(claims):
    import torch

    expect(torch.cuda.is_available(), "torch.cuda.is_available() is False")
    return f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"


@builtin("compute-capability", "gpu")
def compute_capability(claims):
    import torch

    found = torch.cuda.get_device_capability(0)
    expect(found == _sm(claims), f"the device is sm_{found[0]}{found[1]}, the image is for sm_{claims['sm']}")
    return f"sm_{found[0]}{found[1]} as the family says"


def arch_covers(archs: list[str], sm: tuple[int, int]) -> str | None:
    """Which entry of torch.cuda.get_arch_list() runs on `sm`: a cubin of the same major and a lower or
    equal minor, else PTX of a lower or equal capability. Entries may carry a suffix (sm_90a)."""
    cubins, ptx = [], []
    for arch in archs:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
        if not match:
            continue
        cc = (int(match.group(2)), int(match.group(3)))
        if match.group(1) == "sm" and not match.group(4) and cc[0] == sm[0] and cc <= sm:
            cubins.append((cc, arch))
        elif match.group(1) == "compute" and cc <= sm:
            ptx.append((cc, arch))
    best = max(cubins or ptx, default=None)
    return best[1] if best else None


@builtin("arch-list", "gpu")
def arch_list(claims):
    import torch

    archs = torch.cuda.get_arch_list()
    found = arch_covers(archs, _sm(claims))
    expect(found is not None, f"sm_{claims['sm']} is not covered by {archs}")
    return f"covered by {found} in {archs}"


@builtin("bf16", "gpu")
def bf16(claims):
    import torch

    should = _sm(claims) >= (8, 0)
    supported = torch.cuda.is_bf16_supported()
    expect(supported == should, f"bf16 supported={supported}, expected {should} for sm_{claims['sm']}")
    if supported:
        a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        ref = a.float() @ a.float()
        err = ((a @ a).float() - ref).abs().max().item()
        expect(err < 1.0, f"bf16 matmul error {err}")
    return f"bf16 {'works' if supported else 'absent'}, as sm_{claims['sm']} implies"


def _allreduce_worker(rank, world, port, results):
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    t = torch.full((4,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    results[rank] = t[0].item()
    dist.destroy_process_group()


@builtin("nccl-allreduce", "gpu")
def nccl_allreduce(claims):
    import socket

    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    if world < 2:
        return f"{world} GPU visible: no all-reduce to test"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_allreduce_worker, args=(world, port, results), nprocs=world, join=True)
    want = world * (world + 1) / 2
    expect(all(v == want for v in results.values()), f"all-reduce gave {dict(results)}, expected {want}")
    return f"NCCL all-reduce over {world} GPUs"


@builtin("cuda-compat-active", "gpu")
def cuda_compat_active(claims):
    libs = sorted(glob.glob("/usr/local/cuda/compat/libcuda.so.*.*"))
    active = "/usr/local/cuda/compat" in os.environ.get("LD_LIBRARY_PATH", "")
    if not libs:
        expect(not active, "LD_LIBRARY_PATH names cuda-compat, which the image does not have")
        return "no cuda-compat in the image"
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
    host = out.stdout.strip().splitlines()[0]
    compat = libs[-1].rsplit("libcuda.so.", 1)[1]
    older = [int(x) for x in host.split(".")] < [int(x) for x in compat.split(".")]
    expect(active == older, f"host driver {host}, cuda-compat {compat}: compat active={active}, expected {older}")
    return f"host driver {host} vs cuda-compat {compat}: compat {'used' if active else 'not used'}"


# --- user checks ----------------------------------------------------------------------------------------


def run_command(record):
    out = subprocess.run(record["command"], shell=True, capture_output=True, text=True)
    text = out.stdout + out.stderr
    expect(out.returncode == record.get("exit_code", 0), f"exit {out.returncode}: {text.strip()[-300:]}")
    if record.get("expect"):
        expect(re.search(record["expect"], text) is not None,
               f"output does not match /{record['expect']}/: {text.strip()[-300:]}")
    return f"`{record['command']}` ok"


def run_file(record):
    path, exists = record["path"], record.get("exists", True)
    expect(os.path.exists(path) == exists, f"{path} {'is missing' if exists else 'exists'}")
    if exists and record.get("executable"):
        expect(os.access(path, os.X_OK), f"{path} is not executable")
    if exists and record.get("contains"):
        with open(path, errors="replace") as fh:
            expect(re.search(record["contains"], fh.read()) is not None,
                   f"{path} does not contain /{record['contains']}/")
    return f"{path} {'present' if exists else 'absent'}"


def find_builtin(name: str):
    if name in BUILTINS:
        return BUILTINS[name][1]
    if name.endswith("-version"):
        return library_version(name[: -len("-version")])
    raise CheckFailed(f"no builtin check {name} (neither lmi_check nor the profile's checks define it)")


def run_one(record, claims):
    kind = record.get("kind", "builtin")
    if kind == "builtin":
        return find_builtin(record["name"])(claims)
    return {"command": run_command, "file": run_file}[kind](record)


# --- the worker and its supervisor ---------------------------------------------------------------------


def worker(records, claims) -> None:
    """Run checks in order, announcing each, so the supervisor knows which one hangs. Events go to the
    original stdout; fd 1 is pointed at stderr, so what libraries print (some log to stdout, C code too)
    cannot corrupt them."""
    events = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(event: dict) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    for record in records:
        send({"start": record["name"]})
        start = time.monotonic()
        try:
            message, passed = run_one(record, claims), True
        except CheckFailed as exc:
            message, passed = str(exc), False
        except Exception as exc:  # an import error or a crash is a failed check, not a crashed run
            message, passed = f"{type(exc).__name__}: {exc}", False
        send({"name": record["name"], "tier": record.get("tier", "cpu"), "passed": passed, "message": message,
              "seconds": round(time.monotonic() - start, 2)})


def supervise(records, claims_text, timeout, emit, profiles=()) -> bool:
    """Run the records in a worker process (which loads the same profile check modules); a check running past
    `timeout` is killed and reported, and a fresh worker carries on with the rest."""
    remaining = list(records)
    ok = True
    loads = [arg for path in profiles for arg in ("--profile", path)]
    while remaining:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--claims-json", claims_text,
                                 *loads],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        proc.stdin.write(json.dumps(remaining))
        proc.stdin.close()
        lines: list[str] = []
        reader = threading.Thread(target=lambda out=proc.stdout, into=lines: into.extend(out), daemon=True)
        seen, current, started = 0, None, time.monotonic()
        reader.start()
        while True:
            reader.join(0.1)
            while seen < len(lines):
                try:
                    event = json.loads(lines[seen])
                except ValueError:
                    event = {}
                seen += 1
                if not event:
                    continue
                if "start" in event:
                    current, started = event["start"], time.monotonic()
                else:
                    remaining = [r for r in remaining if r["name"] != event["name"]]
                    ok &= event["passed"]
                    emit(event)
                    current = None
            if not reader.is_alive() and seen >= len(lines):
                break
            if current and time.monotonic() - started > timeout:
                proc.kill()
                record = next(r for r in remaining if r["name"] == current)
                emit({"name": current, "tier": record.get("tier", "cpu"), "passed": False,
                      "message": f"timed out after {timeout:.0f} s", "seconds": round(timeout, 2)})
                remaining = [r for r in remaining if r["name"] != current]
                ok = False
                break
        proc.wait()
        if proc.returncode not in (0, -9) and remaining and current:
            # the worker died inside a check (e.g. a segfault): report it and go on
            emit({"name": current, "tier": "cpu", "passed": False, "message": f"worker died ({proc.returncode})",
                  "seconds": 0})
            remaining = [r for r in remaining if r["name"] != current]
            ok = False
    return ok


def default_records(tiers) -> list[dict]:
    return [{"name": n, "tier": t, "kind": "builtin"} for n, (t, _) in BUILTINS.items() if t in tiers]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="lmi in-image checks")
    parser.add_argument("--claims", default="/opt/lmi/image.json", help="what the image claims (image.json)")
    parser.add_argument("--claims-json", help="the claims inline, as JSON (instead of --claims)")
    parser.add_argument("--checks", help="JSON file of check records (default: every builtin of --tier)")
    parser.add_argument("--checks-json", help="the check records inline, as JSON")
    parser.add_argument("--tier", default="cpu", help="tiers for the default records, e.g. cpu,gpu")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per check")
    parser.add_argument("--profile", action="append", default=[], metavar="FILE",
                        help="a profile's check module (<profile>_check.py beside this file) to load; repeatable")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make-tiny-model", metavar="DIR",
                        help="save a tiny random Llama with a tokenizer in DIR and print the greedy continuations "
                             "of --prompt by plain Transformers, as JSON (the serving tier's reference)")
    parser.add_argument("--prompt", action="append", default=[], help="with --make-tiny-model")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="with --make-tiny-model")
    parser.add_argument("--heads", type=int, default=8, choices=(1, 2, 4, 8),
                        help="with --make-tiny-model: attention heads (head size 64/heads)")
    args = parser.parse_args(argv)
    if args.make_tiny_model:
        make_tiny_model(args.make_tiny_model, heads=args.heads)
        print(json.dumps({"reference": reference_generate(args.make_tiny_model, args.prompt, args.max_new_tokens)}))
        return 0
    if args.claims_json:
        claims_text = args.claims_json
    else:
        with open(args.claims) as fh:
            claims_text = fh.read()
    claims = json.loads(claims_text)
    for path in args.profile:
        try:
            load_profile(path)
        except (OSError, ImportError, SyntaxError, ValueError) as exc:
            print(f"--profile {path}: cannot load it: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    if args.worker:
        worker(json.loads(sys.stdin.read()), claims)
        return 0
    if args.checks_json:
        records = json.loads(args.checks_json)
    elif args.checks:
        with open(args.checks) as fh:
            records = json.load(fh)
    else:
        records = default_records(args.tier.split(","))
    ok = supervise(records, claims_text, args.timeout, lambda event: print(json.dumps(event), flush=True),
                   [os.path.abspath(p) for p in args.profile])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
