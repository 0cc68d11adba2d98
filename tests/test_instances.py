"""Instance types as SageMaker users name them (ml.g5.12xlarge): parsed once in buildkit/facts.py against the
sizes in buildkit/data/instances.yaml, and answered by `lmi uri --instance` (run for real) with the family's
URI, the size's GPUs and the tensor_parallel_degree that uses them."""

from __future__ import annotations

import json

import pytest
from conftest import lmi

from buildkit import facts, index
from buildkit.profiles import REGISTRY

F = facts.load(REGISTRY)


@pytest.mark.parametrize("text", ["ml.g5.12xlarge", "g5.12xlarge", "ML.G5.12XLARGE", " ml.g5.12xlarge "])
def test_an_instance_type_is_its_family_and_size(text: str) -> None:
    it = facts.instance_type(text, F)
    assert (it.family, it.size, it.name) == ("g5", "12xlarge", "ml.g5.12xlarge")
    assert (it.gpus, it.tensor_parallel_degree) == (4, 4)
    assert it.summary() == "4 x A10G 24 GB, tensor_parallel_degree=4"


def test_a_bare_family_passes_as_it_is() -> None:
    g5 = facts.instance_type("g5", F)
    assert (g5.family, g5.size, g5.gpus, g5.name) == ("g5", None, None, "g5")
    assert facts.instance_type("cpu", F).family == "cpu"
    assert facts.instance_type("mine", F).facts is None  # a matrix may name a family of its own
    assert facts.instance_type("ml.p6-b200.48xlarge", F).summary() == "8 x B200 180 GB, tensor_parallel_degree=8"
    assert facts.instance_type("p5.4xlarge", F).summary() == "1 x H100 80 GB, tensor_parallel_degree=1"


@pytest.mark.parametrize("text, says", [
    ("ml.g5.13xlarge", "unknown size '13xlarge' of g5 in 'ml.g5.13xlarge': g5 comes as g5.xlarge, g5.2xlarge"),
    ("ml.p4d.48xlarge", "p4d comes as p4d.24xlarge"),
    ("ml.x9.large", "unknown instance family 'x9' in 'ml.x9.large': the GPU families with known sizes are g4dn"),
    ("ml.g7.xlarge", "; did you mean g6 or g5 or g6e?"),
    ("ml.c5.xlarge", "CPU instances take --instance cpu"),
    ("ml.cpu.xlarge", "unknown instance family 'cpu'"),
    ("ml.g5", "'ml.g5' is not an instance type or family; give one like ml.g5.12xlarge"),
    ("g5..12xlarge", "is not an instance type or family"),
    ("g5.12xlarge.x", "is not an instance type or family"),
    ("", "is not an instance type or family"),
])
def test_bad_instance_types_are_one_clear_line(text: str, says: str) -> None:
    with pytest.raises(ValueError) as err:
        facts.instance_type(text, F)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_every_gpu_family_has_sizes_that_agree_with_its_other_facts() -> None:
    """The largest size carries max_gpus, and the memory AWS sells (GB) is the EC2 API's MiB within 10 %."""
    gpu = {n: f for n, f in F.families.items() if f.is_gpu}
    assert gpu and all(f.sizes and f.gpu_model and f.gpu_memory_gb for f in gpu.values())
    for name, fam in gpu.items():
        assert max(fam.sizes.values()) == fam.max_gpus, name
        assert set(fam.sizes.values()) <= {1, 2, 4, 8}, name
        assert fam.gpu_model in fam.gpu, name
        assert 0.9 < fam.gpu_memory_gb * 10**9 / (fam.gpu_memory_mib * 2**20) < 1.1, name
        assert {"sizes", "gpu_memory_gb"} <= set(fam.sources), name
    assert not F.families["cpu"].sizes


def _index(tmp_path) -> tuple[str, str]:
    entries = []
    for n, (family, engine, versions) in enumerate([("p4d", "deepspeed", {"djl": "0.36.0", "deepspeed": "0.18.9"}),
                                                     ("g5", "deepspeed", {"djl": "0.36.0", "deepspeed": "0.18.9"}),
                                                     ("g6e", "vllm", {"vllm": "0.33.0"})], 1):
        digest = f"sha256:{n:064d}"
        entries.append({"id": f"{engine}-{family}", "family": family, "tag": f"t{n}", "digest": digest,
                        "built": "2026-12-07", "engine": engine,
                        "components": {**versions, "torch": "2.14.0", "cuda": "13.0.2", "python": "3.12",
                                       "os": "ubuntu24.04"},
                        "registries": [{"url": "oci://r.example/ml", "kind": "oci", "region": None,
                                        "uri": f"r.example/ml/lmi@{digest}"}]})
    path = tmp_path / "images.json"
    index.update(path, entries, REGISTRY)
    return "--index", str(path)


def test_uri_of_an_instance_type_prints_the_uri_and_its_gpus(tmp_path) -> None:
    at = _index(tmp_path)
    p4d = lmi("uri", "--instance", "ml.p4d.24xlarge", *at)
    assert p4d.returncode == 0, p4d.stderr
    assert p4d.stdout == f"r.example/ml/lmi@sha256:{1:064d}\n"  # stdout stays the URI alone, for $(lmi uri ...)
    assert "ml.p4d.24xlarge: 8 x A100 40 GB, tensor_parallel_degree=8" in p4d.stderr
    g5 = lmi("uri", "--instance", "g5.12xlarge", *at)
    assert g5.stdout.strip().endswith("2") and "ml.g5.12xlarge: 4 x A10G 24 GB, tensor_parallel_degree=4" in g5.stderr
    family = lmi("uri", "--instance", "g5", *at)  # a bare family answers as before, with no size line
    assert family.stdout == g5.stdout and "tensor_parallel_degree" not in family.stderr
    data = json.loads(lmi("uri", "--instance", "ml.g6e.48xlarge", "--engine", "vllm", "--json", *at).stdout)
    assert data["instance"] == {"type": "ml.g6e.48xlarge", "family": "g6e", "gpus": 8, "gpu": "L40S",
                                "gpu_memory_gb": 48, "gpu_memory_mib": 45776, "tensor_parallel_degree": 8}
    assert "instance" not in json.loads(lmi("uri", "--instance", "g6e", "--json", *at).stdout)


@pytest.mark.parametrize("instance, says", [
    ("ml.g5.13xlarge", "--instance: unknown size '13xlarge' of g5"),
    ("ml.p5.48xlarge", "no image for 'ml.p5.48xlarge' (family p5) in the index; it has: g5, g6e, p4d"),
    ("ml.banana", "--instance: 'ml.banana' is not an instance type or family"),
])
def test_uri_refuses_bad_instances_in_one_line(tmp_path, instance: str, says: str) -> None:
    result = lmi("uri", "--instance", instance, *_index(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_check_takes_an_instance_type_as_its_family() -> None:
    args = ["check", "--instance", "ml.g5.12xlarge", "--cuda", "12.4", "--torch", "2.4.0", "--deepspeed", "0.15.1",
            "--djl", "0.30.0", "--python", "3.10", "--os", "ubuntu22.04"]
    result = lmi(*args)
    assert result.returncode == 0 and result.stdout.startswith("ok: g5 can run"), result.stderr
    bad = lmi(*[a if a != "ml.g5.12xlarge" else "ml.g5.7xlarge" for a in args])
    assert bad.returncode == 2 and "unknown size '7xlarge' of g5" in bad.stderr
