"""Just enough of the OCI distribution API for tags, manifests, blob copies and artifacts: plain HTTP
and Basic auth only on loopback, bearer tokens only from HTTPS token services, and credentials never
carried across origins on a redirect."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from .address import is_loopback, redact
from .credentials import stored_credentials
from .errors import AuthError, RegistryError

MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json")


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


class OciClient:
    """Just enough of the distribution API for tags, manifests and blob copies, with retries."""

    def __init__(self, host: str, credentials: tuple[str, str] | None = None, retries: int = 4,
                 backoff: float = 0.5) -> None:
        self.host = host
        self.base = f"{'http' if is_loopback(host) else 'https'}://{host}"
        self.credentials = credentials if credentials is not None else stored_credentials(host)
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
