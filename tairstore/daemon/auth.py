"""Bearer tokens mapped to namespaces and roles.

A daemon configured without tokens is open (``Authenticator.enabled`` is False): every check
passes, which is why it binds loopback by default. With tokens, each request names a token and
the namespace it touches:

- a missing or unknown token is :class:`Unauthenticated` (HTTP 401);
- a known token whose namespaces do not cover the request, or a ``user`` token on an
  admin-only operation, is :class:`~tairstore.errors.PermissionDeniedError` (HTTP 403).

An ``admin`` token covers every namespace. The namespace ``"*"`` in a check means "all
namespaces" (daemon-wide reads such as ``/stats``): only admin tokens and tokens configured with
``namespaces = "*"`` pass it.

Tokens are compared with :func:`hmac.compare_digest` against every configured token, so the time
a check takes does not tell an attacker how much of a guess was right.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal, Sequence

from tairstore.errors import InvalidArgumentError, PermissionDeniedError

__all__ = ["ALL_NAMESPACES", "ROLES", "Authenticator", "TokenSpec", "Unauthenticated"]

ALL_NAMESPACES = "*"
ROLES = ("user", "admin")


class Unauthenticated(PermissionDeniedError):
    """No token, or a token the daemon does not know (HTTP 401)."""


@dataclass(frozen=True)
class TokenSpec:
    """One configured token.

    Attributes:
        token: the secret a client sends as ``Authorization: Bearer <token>``.
        namespaces: the namespaces it may touch, or ``"*"`` for all.
        role: ``"user"`` (data and reads in its namespaces) or ``"admin"`` (everything,
            including namespace and quota changes and trimming whole namespaces).
    """

    token: str
    namespaces: Sequence[str] | Literal["*"] = ALL_NAMESPACES
    role: str = "user"

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token:
            raise InvalidArgumentError("a token must be a non-empty string")
        if self.role not in ROLES:
            raise InvalidArgumentError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.namespaces != ALL_NAMESPACES:
            if isinstance(self.namespaces, str) or not all(
                    isinstance(n, str) and n for n in self.namespaces):
                raise InvalidArgumentError(
                    'namespaces must be "*" or a list of namespace names')
            object.__setattr__(self, "namespaces", tuple(self.namespaces))

    @property
    def is_admin(self) -> bool:
        """True for the admin role."""
        return self.role == "admin"

    def covers(self, namespace: str) -> bool:
        """Whether this token may touch ``namespace`` (``"*"``: every namespace)."""
        if self.is_admin or self.namespaces == ALL_NAMESPACES:
            return True
        return namespace != ALL_NAMESPACES and namespace in self.namespaces


class Authenticator:
    """Checks bearer tokens against the configured :class:`TokenSpec` list."""

    def __init__(self, tokens: Sequence[TokenSpec] = ()) -> None:
        self._tokens = list(tokens)
        seen: set[str] = set()
        for spec in self._tokens:
            if spec.token in seen:
                raise InvalidArgumentError("the same token is configured twice; give each one role")
            seen.add(spec.token)

    @property
    def enabled(self) -> bool:
        """False when no token is configured: every check passes."""
        return bool(self._tokens)

    def identify(self, token: str | None) -> TokenSpec | None:
        """The spec of ``token``, or None when it is missing or unknown."""
        if not token:
            return None
        given = token.encode()
        found = None
        # Compare against every token (no early exit), so timing reveals neither which token
        # matched nor how long a matching prefix was.
        for spec in self._tokens:
            if hmac.compare_digest(given, spec.token.encode()):
                found = spec
        return found

    def check(self, token: str | None, namespace: str, *, admin: bool = False) -> TokenSpec | None:
        """Allow or refuse an operation on ``namespace``.

        Args:
            token: the bearer token the client sent, or None.
            namespace: the namespace the operation touches; ``"*"`` for daemon-wide reads.
            admin: True for admin-only operations.

        Returns:
            the matching spec (None when auth is disabled).

        Raises:
            Unauthenticated: the token is missing or unknown.
            PermissionDeniedError: the token does not cover ``namespace``, or is not admin.
        """
        if not self.enabled:
            return None
        spec = self.identify(token)
        if spec is None:
            if not token:
                raise Unauthenticated("this daemon requires a token: send 'Authorization: Bearer <token>'")
            raise Unauthenticated("unknown token; check the [[tokens]] section of the daemon config")
        if admin and not spec.is_admin:
            raise PermissionDeniedError("this operation needs an admin token")
        if not spec.covers(namespace):
            what = "all namespaces" if namespace == ALL_NAMESPACES else f"namespace {namespace!r}"
            raise PermissionDeniedError(f"the token does not cover {what}")
        return spec

    def visible(self, token: str | None, namespaces: Sequence[str]) -> list[str]:
        """The subset of ``namespaces`` the token may see (all of them when auth is off)."""
        if not self.enabled:
            return list(namespaces)
        spec = self.identify(token)
        if spec is None:
            return []
        return [n for n in namespaces if spec.covers(n)]
