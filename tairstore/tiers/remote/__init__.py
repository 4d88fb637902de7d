"""Remote tiers: blocks spilled to and shared through an existing distributed store.

``make_remote_tier({"kind": "mooncake", ...})`` or ``{"kind": "hf3fs", "path": ...}`` validates
the configuration (:mod:`.config`) and opens the tier. The interface is
:class:`~tairstore.tiers.remote.base.RemoteTier`; docs/REMOTE.md says what survives what.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tairstore.tiers.remote.base import RemoteTier
from tairstore.tiers.remote.config import KINDS, validate_remote_config
from tairstore.tiers.remote.health import HealthTracker

__all__ = ["RemoteTier", "HealthTracker", "KINDS", "make_remote_tier", "validate_remote_config"]


def make_remote_tier(config: Mapping[str, Any]) -> RemoteTier:
    """Validate ``config`` and open the remote tier it names.

    Raises:
        InvalidArgumentError: the configuration is wrong, or the kind's library is missing.
    """
    cfg = validate_remote_config(config)
    if cfg["kind"] == "mooncake":
        from tairstore.tiers.remote.mooncake import MooncakeTier
        return MooncakeTier(cfg)
    from tairstore.tiers.remote.hf3fs import Hf3fsTier
    return Hf3fsTier(cfg)
