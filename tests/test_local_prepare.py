"""What each local matrix needs prepared (tests/local/prepare.py) is resolved without building anything, so a
documented target that builds a local matrix (make build MATRIX=tests/matrix.local.yaml, make test-vllm,
make test-gpu-stack) cannot stop at its first step for a base image nobody knows how to make."""

from __future__ import annotations

import pytest
from conftest import ROOT

from buildkit import facts, matrix
from buildkit.profiles import REGISTRY
from tests.local import prepare

LOCAL_MATRICES = sorted((ROOT / "tests").glob("matrix.*local*.yaml"))


def test_every_local_matrix_is_found() -> None:
    names = {p.name for p in LOCAL_MATRICES}
    assert {"matrix.local.yaml", "matrix.gpu-local.yaml", "matrix.vllm-local.yaml"} <= names


@pytest.mark.parametrize("path", LOCAL_MATRICES, ids=lambda p: p.name)
def test_every_base_a_local_matrix_builds_on_has_a_recipe(path) -> None:
    f = facts.load(REGISTRY)
    m = matrix.load(path, f)
    wanted = prepare.bases_wanted(m, f)
    assert wanted, f"{path.name}: no base image at all"
    assert all(":" in ref for ref in wanted), f"{path.name}: not image references: {wanted}"
    missing = [ref for ref in wanted if not prepare.has_recipe(ref)]
    assert not missing, f"{path.name}: no recipe for {missing}"


def test_a_lines_bases_are_its_images_not_their_roles() -> None:
    f = facts.load(REGISTRY)
    m = matrix.load(ROOT / "tests" / "matrix.vllm-local.yaml", f)
    assert prepare.bases_wanted(m, f) == ["debian:12"]
