"""Credentials that `docker login` stored, found the way the Docker CLI finds them: the docker SDK's
`docker.auth` reads $DOCKER_CONFIG/config.json (or ~/.docker), its `auths`, `credsStore` and
`credHelpers`. They are passed to requests only; never printed or written."""

from __future__ import annotations


def stored_credentials(host: str) -> tuple[str, str] | None:
    """(user, password) stored for `host` (e.g. 127.0.0.1:5000), or None. An identity token (an OAuth
    refresh token some helpers store) is not a password for Basic auth or a token service: None."""
    import docker.auth  # here: the docker SDK costs ~0.1 s to import, and most commands never ask
    import docker.errors

    try:
        found = docker.auth.resolve_authconfig(docker.auth.load_config(), registry=host)
    except (docker.errors.DockerException, OSError, ValueError):
        return None
    if not found:
        return None
    user = found.get("Username") or found.get("username")
    password = found.get("Password") or found.get("password")
    return (user, password) if user and password else None
