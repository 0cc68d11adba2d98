"""Offline stand-ins for the local test matrix (tests/matrix.local.yaml): what cannot be fetched here."""
