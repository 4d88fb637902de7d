"""Adapters that plug tairstore into inference engines through their own plug-in mechanisms.

- :mod:`tairstore.connectors.sglang`: ``HiCacheTairStore``, an SGLang HiCache storage backend.
- :mod:`tairstore.connectors.vllm`: ``TairStoreConnector``, a vLLM ``KVConnectorBase_V1``.
- :mod:`tairstore.connectors.lmcache`: ``TairStoreRemoteConnector``, an LMCache remote backend.

Each imports its engine only when its class is first used, so every module here imports where
the engine (or torch) is not installed. :mod:`tairstore.connectors.common` holds what they
share: the ``tairstore_url`` (daemon address or directory), namespaces per deployment, key
mapping, and a backend on which every failure is a miss. See ``docs/INTEGRATIONS.md``.
"""

from __future__ import annotations

from .common import Backend, Deployment, engine_key, open_backend

__all__ = ["Backend", "Deployment", "engine_key", "open_backend"]
