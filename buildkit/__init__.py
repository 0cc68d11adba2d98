"""lmi-buildkit: large-model-inference container images for AWS GPU instances, from one version matrix."""

__version__ = "0.1.0"
