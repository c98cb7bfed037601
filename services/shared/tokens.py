"""Who holds a key: bearer tokens mapped to their holders' names, the one check behind every guarded
route (the admin routes, ingestion's and prediction's doors).

    >>> tokens = TokenSet([ClientToken(name="shop", token="k7Qx-2mZ9pL4vR8sT1wY6uE3")])
    >>> tokens.identify("Bearer k7Qx-2mZ9pL4vR8sT1wY6uE3"), tokens.identify("Bearer guess"), tokens.identify(None)
    ('shop', None, None)

It must never tell, by its answer or its time, which token came close: the given token's SHA-256 is
compared with every held token's (all of them, no early exit) by `hmac.compare_digest`, so neither
a token's content nor its length shows in the time taken.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from .settings import ClientToken


class TokenSet:
    def __init__(self, holders: Iterable[ClientToken]) -> None:
        self._digests = [(_digest(h.token.get_secret_value()), h.name) for h in holders]
        self.names = tuple(dict.fromkeys(name for _, name in self._digests))  # one name may hold two (rotation)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, authorization: str | None) -> str | None:
        """The name of who holds the token of an `Authorization: Bearer <token>` header, else None."""
        scheme, _, given = (authorization or "").partition(" ")
        digest = _digest(given.strip())
        holder = None
        for expected, name in self._digests:
            if hmac.compare_digest(digest, expected):
                holder = name
        # the scheme is checked last, so that a wrong one costs the same time as a wrong token
        return holder if scheme.lower() == "bearer" else None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
