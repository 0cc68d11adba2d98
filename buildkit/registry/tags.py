"""Listing a repository's tags: the OCI distribution API's paginated tags list, or ECR's ListImages."""

from __future__ import annotations

import json
import re
import urllib.parse

from .ecr import Ecr
from .errors import RegistryError
from .oci import OciClient

PAGE = 1000
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def oci_tags(client: OciClient, repo: str) -> list[str]:
    """Every tag of repo (none when the repository does not exist yet), following the Link header's pages."""
    tags: list[str] = []
    path: str | None = f"/v2/{repo}/tags/list?n={PAGE}"
    while path:
        resp = client.request("GET", path, ok=(200, 404))
        if resp.status == 404:
            return tags
        try:
            tags += json.loads(resp.read()).get("tags") or []
        except ValueError:
            raise RegistryError(f"{client.host}/{repo}: the tags list is not JSON") from None
        link = _NEXT.search(resp.headers.get("Link") or "")
        path = None
        if link:
            nxt = urllib.parse.urlsplit(link.group(1))
            if nxt.netloc and nxt.netloc != client.host:  # never follow a page link to another origin
                raise RegistryError(f"{client.host}/{repo}: the tags list points to another host ({nxt.netloc})")
            path = nxt.path + (f"?{nxt.query}" if nxt.query else "")
    return tags


def ecr_tags(ecr: Ecr, repo: str) -> list[str]:
    """Every tag of an ECR repository (none when it does not exist yet)."""
    from botocore.exceptions import ClientError

    tags: list[str] = []
    try:
        for page in ecr.client.get_paginator("list_images").paginate(
                registryId=ecr.address.account, repositoryName=repo, filter={"tagStatus": "TAGGED"}):
            tags += [i["imageTag"] for i in page.get("imageIds", []) if i.get("imageTag")]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "RepositoryNotFoundException":
            return []
        raise RegistryError(f"ECR list_images {repo}: {exc.response['Error']['Message']}") from None
    return tags
