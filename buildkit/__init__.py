"""lmi-buildkit: large-model-inference container images for AWS GPU instances, from one version matrix."""

__version__ = "0.1.0"

__all__ = ["__version__", "image_uri"]


def image_uri(instance: str, region: str | None = None, *, engine: str | None = None, torch: str | None = None,
              cuda: str | None = None, index: str = "images.json", **components: str | None) -> str:
    """The digest-pinned URI of the newest published image for an instance family, e.g.
    `image_uri("g5", region="us-west-2", torch="2.9")`: of `engine` (a profile's name, as in the matrix's
    `engine:`; any if None) and with the versions given, the engine's components by their matrix keys
    (`lmi matrix` shows them) and torch and cuda, each a version or its prefix. Raises
    buildkit.errors.UserError, saying what does exist, when nothing matches."""
    from .index import image_uri as lookup
    from .profiles import REGISTRY  # the public face assembles the registry, as the CLI does

    return lookup(REGISTRY, instance, region=region, engine=engine, torch=torch, cuda=cuda, index=index, **components)
