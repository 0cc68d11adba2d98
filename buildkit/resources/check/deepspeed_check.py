"""In-image checks of the DeepSpeed profile (DJL Serving in front, DeepSpeed, Accelerate and Diffusers behind):
registered with lmi_check (lmi_check.py beside this file), which `lmi test` mounts at /opt/lmi-check/lmi_check.py
with this file beside it and loads it (`--profile`).

Like lmi_check itself: the standard library and what the image carries, nothing else. The core checks (Python and
torch versions, pip check, the tiny forward pass, CUDA and the GPU) stay in lmi_check, and so do the library
versions (`deepspeed-version`, `transformers-version`, ...: lmi_check compares any `<dist>-version` with the
claims); these add what only a DeepSpeed image has.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import lmi_check
from lmi_check import builtin, expect

# --- cpu tier ----------------------------------------------------------------------------------------------


@builtin("djl-serving-version", "cpu")
def djl_serving_version(claims):
    want = claims.get("versions", {}).get("djl_serving")
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "djl-serving"], capture_output=True, text=True)
    found = out.stdout.strip().split("-")[0] or None
    return lmi_check._compare("DJL Serving", want, found)


@builtin("java-version", "cpu")
def java_version(claims):
    out = subprocess.run(["java", "-version"], capture_output=True, text=True)
    match = re.search(r'version "(\d+)', out.stderr + out.stdout)
    return lmi_check._compare("Java", claims.get("versions", {}).get("java"), match.group(1) if match else None)


@builtin("imports", "cpu")
def imports(claims):
    import accelerate  # noqa: F401
    import deepspeed  # noqa: F401
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return "torch, deepspeed, transformers, diffusers and accelerate import"


def _installed_ops() -> dict:
    from deepspeed.git_version_info import installed_ops

    return {op: bool(on) for op, on in installed_ops.items()}


@builtin("deepspeed-prebuilt-ops", "cpu")
def deepspeed_prebuilt_ops(claims):
    ops = claims.get("deepspeed_ops")
    installed = {op for op, on in _installed_ops().items() if on}
    if ops is None:
        expect(not installed, f"a CPU image claims no prebuilt op, but has {sorted(installed)}")
        return "no op prebuilt (CPU image: DeepSpeed JIT-compiles where a toolkit exists)"
    want = set(ops["prebuilt"])
    missing, extra = sorted(want - installed), sorted(installed - want)
    expect(not missing, f"ops claimed prebuilt that the image lacks: {missing}")
    expect(not extra, "ops prebuilt that the image should not carry: "
                      + ", ".join(f"{op} ({ops['absent'].get(op, 'not claimed')})" for op in extra))
    absent = ", ".join(f"{op} ({why})" for op, why in sorted(ops["absent"].items()))
    return f"{len(want)} ops prebuilt as claimed: {', '.join(sorted(want))}; absent as claimed: {absent or 'none'}"


# --- gpu tier ----------------------------------------------------------------------------------------------

INFERENCE_OPS = {"transformer_inference": "InferenceBuilder", "inference_core_ops": "InferenceCoreBuilder",
                 "ragged_ops": "RaggedUtilsBuilder", "ragged_device_ops": "RaggedOpsBuilder"}


@builtin("deepspeed-ops", "gpu")
def deepspeed_ops(claims):
    """The prebuilt inference ops load on this GPU from the image itself, not from a JIT build."""
    import deepspeed.ops.op_builder as builders

    prebuilt = set((claims.get("deepspeed_ops") or {}).get("prebuilt", []))
    installed = _installed_ops()
    loaded = []
    for op, cls in INFERENCE_OPS.items():
        if op not in prebuilt:
            continue
        expect(installed.get(op), f"{op} is claimed prebuilt but DeepSpeed lists it as not installed")
        start = time.monotonic()
        module = getattr(builders, cls)().load(verbose=False)
        took = time.monotonic() - start
        where = os.path.dirname(getattr(module, "__file__", "") or "")
        expect("site-packages" in where or "dist-packages" in where,
               f"{op} loaded from {where or 'a JIT build'}, not from the installed package")
        loaded.append(f"{op} ({took:.1f} s)")
    expect(bool(loaded) or not prebuilt & set(INFERENCE_OPS), "no inference op was loaded")
    return "prebuilt and loaded without JIT: " + (", ".join(loaded) or "no inference op claimed for this SM")


@builtin("deepspeed-inference", "gpu")
def deepspeed_inference(claims):
    import deepspeed
    import torch

    model, ids = lmi_check.tiny_model()
    model, ids = model.half().cuda(), ids.cuda()
    with torch.no_grad():
        ref = model(ids).logits.float()
    engine = deepspeed.init_inference(model, dtype=torch.half, replace_with_kernel_inject=True)
    with torch.no_grad():
        out = engine(ids).logits.float()
    err = (out - ref).abs().max().item()
    expect(err < 5e-2, f"DeepSpeed inference differs from torch by {err}")
    return f"DeepSpeed kernel-injected inference matches torch (max abs diff {err:.2e})"
