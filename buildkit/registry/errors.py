"""What a registry can answer that the user must act on."""

from __future__ import annotations

from ..errors import LmiError


class RegistryError(LmiError):
    """A registry refused or failed; the message says which and what to do (exit 1)."""

    exit_code = 1


class AuthError(RegistryError):
    """Access denied, or credentials that must not be sent where they were asked for."""
