"""The registry package's parts that need no registry: stored credentials (through the docker SDK's
docker.auth, as the Docker CLI finds them) and the one error base whose exit codes the CLI reads."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from buildkit import cli, engine, publish, registry
from buildkit.errors import LmiError, UserError


@pytest.fixture
def docker_config(tmp_path, monkeypatch):
    """A DOCKER_CONFIG of its own, and a PATH with a credential helper of the test's writing."""
    config = tmp_path / "docker-config"
    config.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-lmitest"
    # The credential-helper protocol: `get` reads the server address on stdin, answers JSON or fails.
    helper.write_text("#!/bin/sh\nread host\ncase \"$host\" in\n"
                      "  helped.example:5000) echo '{\"Username\":\"robot\",\"Secret\":\"from-helper\"}' ;;\n"
                      "  token.example) echo '{\"Username\":\"<token>\",\"Secret\":\"refresh-token\"}' ;;\n"
                      "  *) echo 'credentials not found in native keychain'; exit 1 ;;\nesac\n")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def write(doc: dict) -> None:
        (config / "config.json").write_text(json.dumps(doc))

    return write


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_from_auths_entries(docker_config) -> None:
    docker_config({"auths": {"127.0.0.1:5000": {"auth": _auth("lmi", "pw:with:colons")},
                             "https://registry.example/v1/": {"auth": _auth("old", "style")}}})
    assert registry.stored_credentials("127.0.0.1:5000") == ("lmi", "pw:with:colons")
    assert registry.stored_credentials("registry.example") == ("old", "style")  # a legacy URL key
    assert registry.stored_credentials("127.0.0.1:5001") is None


def test_credentials_from_a_helper_and_what_is_not_a_password(docker_config) -> None:
    docker_config({"credHelpers": {"helped.example:5000": "lmitest", "token.example": "lmitest",
                                   "missing.example": "lmitest"}})
    assert registry.stored_credentials("helped.example:5000") == ("robot", "from-helper")
    assert registry.stored_credentials("token.example") is None  # an identity token: not Basic credentials
    assert registry.stored_credentials("missing.example") is None


def test_no_or_broken_config_means_no_credentials(docker_config, tmp_path) -> None:
    assert registry.stored_credentials("127.0.0.1:5000") is None  # no config.json at all
    (tmp_path / "docker-config" / "config.json").write_text("{not json")
    assert registry.stored_credentials("127.0.0.1:5000") is None


def test_the_oci_client_takes_stored_credentials(docker_config) -> None:
    docker_config({"auths": {"127.0.0.1:5999": {"auth": _auth("lmi", "s3cret")}}})
    assert registry.OciClient("127.0.0.1:5999").credentials == ("lmi", "s3cret")


def test_every_error_carries_its_exit_code() -> None:
    assert issubclass(UserError, LmiError) and UserError.exit_code == 2
    assert issubclass(engine.EngineError, UserError)
    for kind in (registry.RegistryError, registry.AuthError, publish.PublishError, publish.IndexMoved):
        assert issubclass(kind, LmiError) and kind.exit_code == 1, kind


@pytest.mark.parametrize("error, code, printed", [
    (registry.RegistryError("127.0.0.1:5000 did not answer"), 1, "error: 127.0.0.1:5000 did not answer"),
    (registry.AuthError("127.0.0.1:5000: access denied (401)"), 1, "error: 127.0.0.1:5000: access denied (401)"),
    (UserError("matrix.yaml:3: what; fix"), 2, "matrix.yaml:3: what; fix"),
])
def test_cli_main_reads_the_exit_code_of_the_error(monkeypatch, capsys, error, code, printed) -> None:
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "cmd_validate", fails)
    assert cli.main(["validate"]) == code
    err = capsys.readouterr().err
    assert err.strip() == printed and "Traceback" not in err
