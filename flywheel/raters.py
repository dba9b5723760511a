"""Who a rater is: an API key and the request's `user`, and the identity that counts as one.

Pure (no database, no web framework): the server names raters, the store writes their identities
with every row, the pooling rules (flywheel/rater_pooling.py) read them back.
"""

from __future__ import annotations

from dataclasses import dataclass

ANONYMOUS = "anonymous"  # the identity of feedback with neither a `user` nor an API key


@dataclass(frozen=True)
class Rater:
    """Who sends feedback: the caller's API key (its scope, None on a server without keys) and
    the request's `user`.

    `identity` is what caps, weights and pooling count as one rater. Without keys everyone is
    trusted and `user` names the rater. A trusted key (an app backend vouching for its end users)
    makes each of its `user` values a rater of its own. Any other key is one rater, whatever
    `user` values it sends: minting names buys no weight. `admin`: may rate any key's answers.
    """

    key_scope: str | None = None
    user: str | None = None
    trusted: bool = False
    admin: bool = False

    @property
    def identity(self) -> str:
        if self.key_scope is None:
            return ANONYMOUS if self.user is None else f"user:{self.user}"
        if not self.trusted:
            return f"key:{self.key_scope}"
        return f"key:{self.key_scope}/" + (ANONYMOUS if self.user is None else f"user:{self.user}")

    @property
    def voter(self) -> str:
        """Who has one vote per answer: the key together with `user`, whatever the key's trust
        (an untrusted key's users pool as one rater, but each keeps one vote per answer)."""
        key = "" if self.key_scope is None else f"key:{self.key_scope}/"
        return key + (ANONYMOUS if self.user is None else f"user:{self.user}")

    @property
    def owner_scope(self) -> str | None:
        """The key an answer must have been served to for this rater to rate it (None: any)."""
        return None if self.admin else self.key_scope


def is_untrusted_key(identity: str) -> bool:
    """Whether an identity is an untrusted key's (all its users as one rater)."""
    return identity.startswith("key:") and "/" not in identity
