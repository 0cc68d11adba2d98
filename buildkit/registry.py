"""Registries: addresses, the OCI distribution API, ECR's control plane, and the embedded local registry.

Addresses are URLs: `ecr://ACCOUNT/REGION[/PREFIX]` or `oci://HOST[:PORT][/PREFIX]`. With none
configured, the embedded default is a local registry on 127.0.0.1:5000 (Debian's docker-registry).
Credentials come from the engine's credential store (`docker login`); an ECR token goes only to
`docker login --password-stdin` and to request headers, never to a log, stdout or a file of ours.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .spec import ALIAS_FILTERS, is_alias  # noqa: F401 - one place for what an alias is

DEFAULT_REGISTRY = "oci://127.0.0.1:5000"
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json")
UNTAGGED_EXPIRY_DAYS = 14


class RegistryError(Exception):
    """A registry refused or failed; the message says which and what to do."""


class AuthError(RegistryError):
    pass


@dataclass(frozen=True)
class Address:
    url: str
    kind: str  # "oci" or "ecr"
    host: str
    prefix: str = ""
    account: str | None = None
    region: str | None = None

    def path(self, repository: str) -> str:
        return f"{self.prefix}/{repository}" if self.prefix else repository

    def ref(self, repository: str, tag: str | None = None, digest: str | None = None) -> str:
        base = f"{self.host}/{self.path(repository)}"
        return f"{base}@{digest}" if digest else f"{base}:{tag}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def host_only(host: str) -> str:
    """'127.0.0.1:5000' -> '127.0.0.1', '[::1]:5000' -> '::1'."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """The one rule for what counts as loopback (plain HTTP and Basic auth are allowed only there):
    `localhost` or an IP address in 127.0.0.0/8 or ::1, parsed, never prefix-matched (127.evil.example
    is a host name, not loopback)."""
    name = host_only(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def redact(url: str) -> str:
    """A URL fit for messages and logs: any user:password@ replaced."""
    return re.sub(r"(?<=://)[^/@\s]*@", "***@", url)


class _NoCrossOriginAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry credentials to another origin (scheme, host or port), nor from
    HTTPS down to HTTP."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            old, dest = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(new.full_url)
            if (old.scheme, old.hostname, old.port) != (dest.scheme, dest.hostname, dest.port):
                for name in list(new.headers):
                    if name.lower() == "authorization":
                        del new.headers[name]
                new.unredirected_hdrs.pop("Authorization", None)
        return new


_OPENER = urllib.request.build_opener(_NoCrossOriginAuth)


def urlopen(req, timeout: float):
    return _OPENER.open(req, timeout=timeout)


def parse(url: str) -> Address:
    """An address from its URL; bad ones are bad input with an example."""
    m = re.fullmatch(r"ecr://(\d{12})/([a-z]{2}(?:-gov)?-[a-z]+-\d)(?:/([a-z0-9._/-]+))?", url)
    if m:
        account, region, prefix = m.groups()
        return Address(url, "ecr", f"{account}.dkr.ecr.{region}.amazonaws.com", (prefix or "").strip("/"),
                       account, region)
    m = re.fullmatch(r"oci://([A-Za-z0-9.-]+(?::\d{1,5})?|\[[0-9a-fA-F:]+\](?::\d{1,5})?)(?:/([a-z0-9._/-]+))?", url)
    if m:
        return Address(url, "oci", m.group(1), (m.group(2) or "").strip("/"))
    raise UserError(f"registry '{redact(url)}' is not an address; use ecr://ACCOUNT/REGION[/PREFIX] "
                    "(e.g. ecr://123456789012/us-west-2/ml) or oci://HOST[:PORT][/PREFIX] (e.g. oci://127.0.0.1:5000)")


# --- credentials from the engine's store -----------------------------------------------------------------


def docker_credentials(host: str) -> tuple[str, str] | None:
    """(user, secret) that `docker login HOST` stored, from config.json or a credential helper."""
    config_dir = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker"))
    try:
        config = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
    if helper and shutil.which(f"docker-credential-{helper}"):
        out = subprocess.run([f"docker-credential-{helper}", "get"], input=host, capture_output=True, text=True)
        if out.returncode == 0:
            data = json.loads(out.stdout)
            return data["Username"], data["Secret"]
    for key, entry in (config.get("auths") or {}).items():
        if key.replace("https://", "").replace("http://", "").rstrip("/") == host and entry.get("auth"):
            user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, secret
    return None


# --- the OCI distribution API --------------------------------------------------------------------------------


class OciClient:
    """Just enough of the distribution API for tags, manifests and blob copies, with retries."""

    def __init__(self, host: str, credentials: tuple[str, str] | None = None, retries: int = 4,
                 backoff: float = 0.5) -> None:
        self.host = host
        self.base = f"{'http' if is_loopback(host) else 'https'}://{host}"
        self.credentials = credentials if credentials is not None else docker_credentials(host)
        self.retries = retries
        self.backoff = backoff
        self._bearer: str | None = None

    def _auth_header(self, challenge: str | None) -> str | None:
        if challenge and challenge.lower().startswith("bearer"):
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
            realm = urllib.parse.urlsplit(params["realm"])
            if realm.scheme != "https" and not (realm.scheme == "http" and is_loopback(realm.netloc)):
                raise AuthError(f"{self.host}: its token service {redact(params['realm'])} is not HTTPS; "
                                "credentials are never sent there")
            req = urllib.request.Request(f"{params['realm']}?{query}")
            if self.credentials:
                req.add_header("Authorization", self._basic())
            with urlopen(req, timeout=30) as resp:
                body = json.loads(resp.read())
            self._bearer = "Bearer " + (body.get("token") or body.get("access_token"))
            return self._bearer
        return self._basic() if self.credentials else None

    def _basic(self) -> str:
        return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()

    def request(self, method: str, path: str, headers: dict | None = None, data=None, ok=(200,)):
        """One API call; 5xx and connection failures are retried with backoff, 401 answered once."""
        url = path if path.startswith("http") else self.base + path
        auth = self._bearer or (self._auth_header(None) if self.credentials else None)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, method=method, headers=dict(headers or {}), data=data)
            if auth:
                req.add_header("Authorization", auth)
            try:
                resp = urlopen(req, timeout=120)
                if resp.status in ok:
                    return resp
                raise RegistryError(f"{method} {url}: unexpected HTTP {resp.status}")
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and attempt == 0:
                    auth = self._auth_header(exc.headers.get("WWW-Authenticate"))
                    if auth:
                        continue
                if exc.code in (401, 403):
                    raise AuthError(f"{self.host}: access denied ({exc.code}); log in with `docker login {self.host}` "
                                    "(for ECR, lmi logs in itself) and check the account's permissions") from None
                if exc.code in ok:
                    return exc
                if exc.code < 500 and exc.code != 429:
                    detail = exc.read()[:300].decode(errors="replace")
                    raise RegistryError(f"{method} {url}: HTTP {exc.code} {detail}") from None
                last = exc
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = exc
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
            if hasattr(data, "seek"):
                data.seek(0)
        raise RegistryError(f"{self.host} did not answer {method} {path} after {self.retries + 1} tries: "
                            f"{getattr(last, 'reason', None) or last}")

    def manifest(self, repo: str, ref: str) -> tuple[str, str, bytes] | None:
        """(digest, media type, body) of repo:ref, or None if absent."""
        resp = self.request("GET", f"/v2/{repo}/manifests/{ref}", {"Accept": ", ".join(MANIFEST_TYPES)},
                            ok=(200, 404))
        if resp.status == 404:
            return None
        body = resp.read()
        digest = resp.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()
        return digest, resp.headers.get("Content-Type", "").split(";")[0], body

    def config_digest(self, repo: str, ref: str) -> str | None:
        """The image ID (config digest) that repo:ref points at: what the local engine calls Id."""
        found = self.manifest(repo, ref)
        if found is None:
            return None
        doc = json.loads(found[2])
        return (doc.get("config") or {}).get("digest")

    def has_blob(self, repo: str, digest: str) -> bool:
        return self.request("HEAD", f"/v2/{repo}/blobs/{digest}", ok=(200, 404)).status == 200

    def copy_blob(self, src: OciClient, src_repo: str, repo: str, digest: str) -> None:
        if self.has_blob(repo, digest):
            return
        if src.host == self.host:  # same registry: mount, no bytes move
            resp = self.request("POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={src_repo}", data=b"",
                                ok=(201, 202))
            if resp.status == 201:
                return
        with tempfile.TemporaryFile() as tmp:
            resp = src.request("GET", f"/v2/{src_repo}/blobs/{digest}")
            shutil.copyfileobj(resp, tmp)
            tmp.seek(0)
            self.put_blob(repo, digest, tmp)

    def put_blob(self, repo: str, digest: str, data) -> None:
        resp = self.request("POST", f"/v2/{repo}/blobs/uploads/", data=b"", ok=(202,))
        location = resp.headers["Location"]
        if not location.startswith("http"):
            location = self.base + location
        sep = "&" if "?" in location else "?"
        size = os.fstat(data.fileno()).st_size if hasattr(data, "fileno") else len(data)
        self.request("PUT", f"{location}{sep}digest={digest}", {"Content-Type": "application/octet-stream",
                                                                 "Content-Length": str(size)}, data=data, ok=(201,))

    def put_manifest(self, repo: str, ref: str, media_type: str, body: bytes) -> str:
        resp = self.request("PUT", f"/v2/{repo}/manifests/{ref}", {"Content-Type": media_type}, data=body, ok=(201,))
        return resp.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def copy_image(self, src: OciClient, src_repo: str, ref: str, repo: str, tags: list[str]) -> str:
        """Copy repo:ref (by its digest) with every blob, then point `tags` at it. No engine needed."""
        found = src.manifest(src_repo, ref)
        if found is None:
            raise RegistryError(f"{src.host}/{src_repo}:{ref} does not exist")
        digest, media_type, body = found
        doc = json.loads(body)
        children = [m["digest"] for m in doc.get("manifests", [])]
        for child in children:  # a multi-arch index: copy each platform's manifest first
            self.copy_image(src, src_repo, child, repo, [child])
        for blob in [doc.get("config", {}).get("digest")] + [layer["digest"] for layer in doc.get("layers", [])]:
            if blob:
                self.copy_blob(src, src_repo, repo, blob)
        for tag in tags:
            self.put_manifest(repo, tag, media_type, body)
        return digest

    def push_artifact(self, repo: str, tag: str, payload: bytes, media_type: str) -> str:
        """Publish a file (e.g. the release index) as an OCI artifact beside the images."""
        empty = b"{}"
        for blob in (payload, empty):
            self.put_blob(repo, "sha256:" + hashlib.sha256(blob).hexdigest(), blob)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": media_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": len(empty),
                       "digest": "sha256:" + hashlib.sha256(empty).hexdigest()},
            "layers": [{"mediaType": media_type, "size": len(payload),
                        "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
                        "annotations": {"org.opencontainers.image.title": "images.json"}}],
        }, sort_keys=True).encode()
        return self.put_manifest(repo, tag, "application/vnd.oci.image.manifest.v1+json", manifest)


# --- ECR's control plane (boto3) -------------------------------------------------------------------------------


class Ecr:
    """Repositories, their settings, tokens and server-side retagging, through the ECR API."""

    def __init__(self, address: Address) -> None:
        import boto3

        self.address = address
        self.client = boto3.client("ecr", region_name=address.region)

    def ensure_repository(self, name: str, kms_key: str | None = None) -> list[str]:
        """The repository exists with scan-on-push, immutable tags (aliases excepted), encryption and a
        lifecycle policy for untagged images. Returns what it changed."""
        from botocore.exceptions import ClientError

        changed = []
        exclusions = [{"filterType": "WILDCARD", "filter": f} for f in ALIAS_FILTERS]
        encryption = {"encryptionType": "KMS", "kmsKey": kms_key} if kms_key else {"encryptionType": "AES256"}
        try:
            self.client.create_repository(
                registryId=self.address.account, repositoryName=name, imageTagMutability="IMMUTABLE_WITH_EXCLUSION",
                imageTagMutabilityExclusionFilters=exclusions, imageScanningConfiguration={"scanOnPush": True},
                encryptionConfiguration=encryption, tags=[{"Key": "managed-by", "Value": "lmi-buildkit"}])
            changed.append(f"created repository {name}")
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "RepositoryAlreadyExistsException":
                raise RegistryError(f"ECR create_repository {name}: {exc.response['Error']['Message']}") from None
            repo = self.client.describe_repositories(registryId=self.address.account,
                                                     repositoryNames=[name])["repositories"][0]
            if repo.get("imageTagMutability") != "IMMUTABLE_WITH_EXCLUSION":
                self.client.put_image_tag_mutability(
                    registryId=self.address.account, repositoryName=name,
                    imageTagMutability="IMMUTABLE_WITH_EXCLUSION", imageTagMutabilityExclusionFilters=exclusions)
                changed.append(f"{name}: tags made immutable (aliases excepted)")
            if not (repo.get("imageScanningConfiguration") or {}).get("scanOnPush"):
                self.client.put_image_scanning_configuration(
                    registryId=self.address.account, repositoryName=name,
                    imageScanningConfiguration={"scanOnPush": True})
                changed.append(f"{name}: scan on push enabled")
        policy = json.dumps({"rules": [{
            "rulePriority": 1, "description": f"expire untagged images after {UNTAGGED_EXPIRY_DAYS} days",
            "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days",
                          "countNumber": UNTAGGED_EXPIRY_DAYS},
            "action": {"type": "expire"}}]}, sort_keys=True)
        self.client.put_lifecycle_policy(registryId=self.address.account, repositoryName=name,
                                         lifecyclePolicyText=policy)
        return changed

    def token(self) -> tuple[str, str]:
        """(user, password) for the registry; the password is a secret: pass it, never print it."""
        data = self.client.get_authorization_token(registryIds=[self.address.account])["authorizationData"][0]
        user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        return user, password

    def config_digest(self, repo: str, tag: str) -> str | None:
        found = self._manifest(repo, {"imageTag": tag})
        return json.loads(found["imageManifest"]).get("config", {}).get("digest") if found else None

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        found = self._manifest(repo, {"imageTag": tag})
        return found["imageId"]["imageDigest"] if found else None

    def _manifest(self, repo: str, image_id: dict) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            out = self.client.batch_get_image(registryId=self.address.account, repositoryName=repo,
                                              imageIds=[image_id], acceptedMediaTypes=list(MANIFEST_TYPES))
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "RepositoryNotFoundException":
                return None
            raise
        return out["images"][0] if out.get("images") else None

    def retag(self, src_repo: str, digest: str, repo: str, tags: list[str]) -> None:
        """Point tags at an image by digest, server side (same account and region: no bytes move)."""
        from botocore.exceptions import ClientError

        image = self._manifest(src_repo, {"imageDigest": digest})
        if image is None:
            raise RegistryError(f"{self.address.host}/{src_repo}@{digest} does not exist")
        for tag in tags:
            # Decide from what the tag holds, not from which exception a server chooses to raise.
            current = self._manifest(repo, {"imageTag": tag})
            if current and current["imageId"]["imageDigest"] == digest:
                continue
            if current and not is_alias(tag):
                raise RegistryError(f"{repo}:{tag} already holds another image; immutable tags are never overwritten")
            try:
                kwargs = {"imageManifestMediaType": image["imageManifestMediaType"]} \
                    if image.get("imageManifestMediaType") else {}
                self.client.put_image(registryId=self.address.account, repositoryName=repo,
                                      imageManifest=image["imageManifest"], imageTag=tag, **kwargs)
            except ClientError as exc:
                now = self._manifest(repo, {"imageTag": tag})
                if not (now and now["imageId"]["imageDigest"] == digest):
                    raise RegistryError(f"ECR put_image {repo}:{tag}: {exc.response['Error']['Message']}") from None


# --- the embedded local registry ---------------------------------------------------------------------------


def registry_answers(host: str) -> bool:
    try:
        urllib.request.urlopen(f"http://{host}/v2/", timeout=2)
        return True
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, wants credentials
    except (urllib.error.URLError, OSError):
        return False


def ensure_local_registry(host: str = "127.0.0.1:5000", root: Path = Path(".lmi/registry"),
                          htpasswd: Path | None = None, wait_s: float = 30) -> str:
    """Start Debian's docker-registry on a loopback address when nothing answers there."""
    if registry_answers(host):
        return f"registry already answers on {host}"
    address, _, port = host.rpartition(":")
    if not is_loopback(host):
        raise UserError(f"{host}: the embedded registry only ever listens on loopback")
    binary = shutil.which("docker-registry")
    if not binary:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise UserError("no registry answers on 127.0.0.1:5000 and docker-registry is not installed; "
                            "install Debian's docker-registry, or give --registry")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-registry"], check=True,
                       env=env, capture_output=True)
        binary = shutil.which("docker-registry")
    root = root.resolve()
    (root / "data").mkdir(parents=True, exist_ok=True)
    auth = (f"auth:\n  htpasswd:\n    realm: lmi\n    path: {htpasswd.resolve()}\n" if htpasswd else "")
    config = root / f"config-{port}.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
                      f"http:\n  addr: {host}\n{auth}")
    log = (root / f"registry-{port}.log").open("ab")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if registry_answers(host):
            (root / f"registry-{port}.pid").write_text(str(proc.pid))
            return f"started docker-registry on {host} (data in {root / 'data'})"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise UserError(f"docker-registry did not start on {host}; see {root / f'registry-{port}.log'}")
