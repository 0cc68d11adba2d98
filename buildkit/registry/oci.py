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

    # --- OCI 1.1 referrers: artifacts (SBOM, provenance) attached to an image manifest by `subject` ----------

    def blob(self, repo: str, digest: str) -> bytes:
        """A blob, checked against its digest (a registry or proxy that alters it is refused)."""
        data = self.request("GET", f"/v2/{repo}/blobs/{digest}").read()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise RegistryError(f"{self.host}/{repo}: blob {digest} does not match its digest; refusing it")
        return data

    def push_referrer(self, repo: str, subject: str, artifact_type: str, payload: bytes,
                      annotations: dict[str, str] | None = None) -> str:
        """Attach `payload` to the manifest `subject` (a digest in repo) as an OCI 1.1 artifact manifest with a
        `subject` field. Returns the artifact manifest's digest. Pushing the same payload again is a no-op."""
        found = self.manifest(repo, subject)
        if found is None:
            raise RegistryError(f"{self.host}/{repo}@{subject} does not exist; push the image first")
        empty = b"{}"
        for blob in (payload, empty):
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            if not self.has_blob(repo, digest):
                self.put_blob(repo, digest, blob)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": len(empty),
                       "digest": "sha256:" + hashlib.sha256(empty).hexdigest()},
            "layers": [{"mediaType": artifact_type, "size": len(payload),
                        "digest": "sha256:" + hashlib.sha256(payload).hexdigest()}],
            "subject": {"mediaType": found[1] or OCI_MANIFEST, "digest": found[0], "size": len(found[2])},
            "annotations": dict(sorted((annotations or {}).items())),
        }, sort_keys=True).encode()
        return self.put_referrer(repo, manifest)

    def put_referrer(self, repo: str, body: bytes) -> str:
        """PUT an artifact manifest with a subject by its digest. A registry that does not answer with the
        OCI-Subject header has no referrers API: the manifest is then also listed in the referrers tag
        (`sha256-<hex>` of the subject), an image index, as the distribution spec's fallback says."""
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        resp = self.request("PUT", f"/v2/{repo}/manifests/{digest}", {"Content-Type": OCI_MANIFEST}, data=body,
                            ok=(201,))
        doc = json.loads(body)
        if resp.headers.get("OCI-Subject") is None:
            descriptor = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body),
                          "artifactType": doc.get("artifactType") or doc["config"]["mediaType"]}
            if doc.get("annotations"):
                descriptor["annotations"] = doc["annotations"]
            tag = referrers_tag(doc["subject"]["digest"])
            found = self.manifest(repo, tag)
            listed = json.loads(found[2]).get("manifests", []) if found else []
            if all(m.get("digest") != digest for m in listed):
                index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*listed, descriptor]}
                self.put_manifest(repo, tag, OCI_INDEX, json.dumps(index, sort_keys=True).encode())
        return digest

    def referrers(self, repo: str, digest: str, artifact_type: str | None = None) -> list[dict]:
        """Descriptors of the artifacts whose subject is `digest`: from the referrers API where the registry
        has one, else from the referrers tag."""
        resp = self.request("GET", f"/v2/{repo}/referrers/{digest}", {"Accept": OCI_INDEX}, ok=(200, 404))
        if resp.status == 200 and resp.headers.get("Content-Type", "").split(";")[0] == OCI_INDEX:
            listed = json.loads(resp.read()).get("manifests", [])
        else:
            found = self.manifest(repo, referrers_tag(digest))
            listed = json.loads(found[2]).get("manifests", []) if found else []
        # what a registry lists is not trusted: only well-formed sha256 descriptors are used
        return [m for m in listed if isinstance(m, dict) and _DIGEST.fullmatch(str(m.get("digest")))
                and (artifact_type is None or m.get("artifactType") == artifact_type)]

    def referrer_payload(self, repo: str, digest: str, subject: str | None = None) -> tuple[str, bytes]:
        """(artifact type, payload) of one artifact manifest, every digest checked (and its subject, if given)."""
        found = self.manifest(repo, digest)
        if found is None:
            raise RegistryError(f"{self.host}/{repo}@{digest}: no such artifact")
        if "sha256:" + hashlib.sha256(found[2]).hexdigest() != digest:
            raise RegistryError(f"{self.host}/{repo}@{digest}: the manifest does not match its digest")
        try:
            doc = json.loads(found[2])
            layer = doc["layers"][0]["digest"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RegistryError(f"{self.host}/{repo}@{digest}: not an artifact manifest with a layer") from None
        if not _DIGEST.fullmatch(str(layer)):
            raise RegistryError(f"{self.host}/{repo}@{digest}: names layer {str(layer)[:80]!r}, not a sha256 digest")
        if subject is not None and (doc.get("subject") or {}).get("digest") != subject:
            raise RegistryError(f"{self.host}/{repo}@{digest}: is not attached to {subject}")
        return doc.get("artifactType", ""), self.blob(repo, layer)

    def copy_referrers(self, src: OciClient, src_repo: str, digest: str, repo: str) -> list[str]:
        """Copy every artifact attached to `digest` in src to this registry (after the image itself)."""
        copied = []
        for ref in src.referrers(src_repo, digest):
            found = src.manifest(src_repo, ref["digest"])
            if found is None:
                continue
            doc = json.loads(found[2])
            blobs = [doc.get("config", {}).get("digest")] + [layer.get("digest") for layer in doc.get("layers", [])]
            if ("sha256:" + hashlib.sha256(found[2]).hexdigest() != ref["digest"]
                    or (doc.get("subject") or {}).get("digest") != digest
                    or not all(_DIGEST.fullmatch(str(b)) for b in blobs)):
                raise RegistryError(f"{src.host}/{src_repo}: referrer {ref['digest']} of {digest} does not match its "
                                    "digest, names another subject or a malformed blob; not copied")
            for blob in blobs:
                self.copy_blob(src, src_repo, repo, blob)
            copied.append(self.put_referrer(repo, found[2]))
        return copied


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def referrers_tag(digest: str) -> str:
    """The fallback tag that lists a manifest's referrers: `sha256-<hex>` (OCI distribution spec 1.1)."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}-{hexdigest}"
