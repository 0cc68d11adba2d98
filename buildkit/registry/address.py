"""Registry addresses: `ecr://ACCOUNT/REGION[/PREFIX]` or `oci://HOST[:PORT][/PREFIX]`, what counts as
loopback (the one place for that rule), and URLs fit for messages."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import UserError

DEFAULT_REGISTRY = "oci://127.0.0.1:5000"


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
    raise UserError(f"registry {redact(url)!r} is not an address; use ecr://ACCOUNT/REGION[/PREFIX] "
                    "(e.g. ecr://123456789012/us-west-2/ml) or oci://HOST[:PORT][/PREFIX] (e.g. oci://127.0.0.1:5000)")
