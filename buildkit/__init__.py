"""lmi-buildkit: large-model-inference container images for AWS GPU instances, from one version matrix."""

__version__ = "0.1.0"

__all__ = ["__version__", "image_uri"]


def image_uri(instance: str, region: str | None = None, djl: str | None = None, deepspeed: str | None = None,
              torch: str | None = None, cuda: str | None = None, index: str = "images.json") -> str:
    """The digest-pinned URI of the newest published image for an instance family, e.g.
    `image_uri("g5", region="us-west-2", djl="0.27")`. Raises buildkit.errors.UserError, saying what
    does exist, when nothing matches."""
    from .index import image_uri as lookup

    return lookup(instance, region=region, djl=djl, deepspeed=deepspeed, torch=torch, cuda=cuda, index=index)
