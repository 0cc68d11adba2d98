"""Registries, one module per concern: addresses (`address`), stored credentials (`credentials`), the OCI
distribution API (`oci`), ECR's control plane (`ecr`) and the embedded local registry (`local`).

Addresses are URLs: `ecr://ACCOUNT/REGION[/PREFIX]` or `oci://HOST[:PORT][/PREFIX]`. With none
configured, the embedded default is a local registry on 127.0.0.1:5000 (Debian's docker-registry).
Credentials come from the engine's credential store (`docker login`); an ECR token goes only to
`docker login --password-stdin` and to request headers, never to a log, stdout or a file of ours.
"""

from __future__ import annotations

from .address import DEFAULT_REGISTRY, Address, host_only, is_loopback, parse, redact
from .credentials import stored_credentials
from .ecr import UNTAGGED_EXPIRY_DAYS, Ecr
from .errors import AuthError, RegistryError
from .local import ensure_local_registry, registry_answers
from .oci import MANIFEST_TYPES, OciClient, referrers_tag, urlopen

__all__ = ["DEFAULT_REGISTRY", "MANIFEST_TYPES", "UNTAGGED_EXPIRY_DAYS", "Address", "AuthError", "Ecr", "OciClient",
           "RegistryError", "ensure_local_registry", "host_only", "is_loopback", "parse", "redact",
           "referrers_tag", "registry_answers", "stored_credentials", "urlopen"]
