"""ECR's control plane (boto3): repositories and their settings, tokens, and server-side retagging."""

from __future__ import annotations

import base64
import json

from ..spec import IMMUTABLE_FILTERS, is_alias
from .address import Address
from .errors import RegistryError
from .oci import MANIFEST_TYPES

UNTAGGED_EXPIRY_DAYS = 14


class Ecr:
    """Repositories, their settings, tokens and server-side retagging, through the ECR API."""

    def __init__(self, address: Address) -> None:
        import boto3

        self.address = address
        self.client = boto3.client("ecr", region_name=address.region)

    def ensure_repository(self, name: str, kms_key: str | None = None) -> list[str]:
        """The repository exists with scan-on-push, immutable revision and content-hash tags (every other tag is
        an alias and moves: MUTABLE_WITH_EXCLUSION on spec.IMMUTABLE_FILTERS), encryption and a lifecycle policy
        for untagged images. Returns what it changed."""
        from botocore.exceptions import ClientError

        changed = []
        exclusions = [{"filterType": "WILDCARD", "filter": f} for f in IMMUTABLE_FILTERS]
        encryption = {"encryptionType": "KMS", "kmsKey": kms_key} if kms_key else {"encryptionType": "AES256"}
        try:
            self.client.create_repository(
                registryId=self.address.account, repositoryName=name, imageTagMutability="MUTABLE_WITH_EXCLUSION",
                imageTagMutabilityExclusionFilters=exclusions, imageScanningConfiguration={"scanOnPush": True},
                encryptionConfiguration=encryption, tags=[{"Key": "managed-by", "Value": "lmi-buildkit"}])
            changed.append(f"created repository {name}")
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "RepositoryAlreadyExistsException":
                raise RegistryError(f"ECR create_repository {name}: {exc.response['Error']['Message']}") from None
            repo = self.client.describe_repositories(registryId=self.address.account,
                                                     repositoryNames=[name])["repositories"][0]
            filters = {f.get("filter") for f in repo.get("imageTagMutabilityExclusionFilters") or []}
            if repo.get("imageTagMutability") != "MUTABLE_WITH_EXCLUSION" or filters != set(IMMUTABLE_FILTERS):
                self.client.put_image_tag_mutability(
                    registryId=self.address.account, repositoryName=name,
                    imageTagMutability="MUTABLE_WITH_EXCLUSION", imageTagMutabilityExclusionFilters=exclusions)
                changed.append(f"{name}: revision and content-hash tags made immutable (the rest are aliases)")
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
