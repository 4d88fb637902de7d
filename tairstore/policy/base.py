"""The eviction-policy contract and the bookkeeping every policy shares.

:class:`EvictionPolicy` is the protocol the store, HiSim and the trace replayer program against
(the full contract is in :mod:`tairstore.policy`'s docstring). :class:`PolicyBase` implements
the parts that do not depend on the eviction order: size accounting, ``victims``, argument
checks. A concrete policy implements ``_insert``, ``_access``, ``_remove`` and ``_pop``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, KeysView
from typing import ClassVar, Protocol, runtime_checkable

from tairstore.errors import InvalidArgumentError

__all__ = ["EvictionPolicy", "PolicyBase", "SkipFn"]

#: ``skip(key)`` is True when ``key`` cannot be evicted right now (a reader pins it).
SkipFn = Callable[[Hashable], bool]


@runtime_checkable
class EvictionPolicy(Protocol):
    """Decides which resident block of one tier leaves next. Pure: no I/O, locks or threads."""

    name: str

    def on_insert(self, key: Hashable, size: int, parent: Hashable | None = None) -> None:
        """``key`` (``size`` bytes, prefix block ``parent``) now resides in the tier."""

    def on_access(self, key: Hashable) -> None:
        """``key`` was hit; unknown keys are ignored."""

    def on_remove(self, key: Hashable) -> None:
        """``key`` left the tier for a reason decided elsewhere; unknown keys are ignored."""

    def pop_victim(self, skip: SkipFn | None = None) -> Hashable | None:
        """Choose, forget and return the next block to evict; None when none is evictable."""

    def victims(self, n_bytes: int, skip: SkipFn | None = None) -> list[Hashable]:
        """Pop victims until their sizes sum to at least ``n_bytes`` or none is evictable."""

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    @property
    def bytes(self) -> int:
        """Total size of the tracked (resident) blocks."""


class PolicyBase:
    """Size accounting and the generic ``victims`` loop; subclasses order the evictions.

    Subclasses keep ``self._sizes`` (key -> size of every resident key) up to date only through
    the methods here, so ``len``, ``in`` and ``bytes`` are exact by construction.
    """

    name: ClassVar[str] = "base"

    def __init__(self, capacity_bytes: int | None = None) -> None:
        """Args:
        capacity_bytes: the managed tier's capacity, for policies whose rules are fractions
            of it (S3-FIFO's small queue). Policies that do not need it ignore it, so callers
            can build any policy with the same arguments.
        """
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise InvalidArgumentError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._sizes: dict[Hashable, int] = {}
        self._bytes = 0

    # ------------------------------------------------------------------------ public contract
    def on_insert(self, key: Hashable, size: int, parent: Hashable | None = None) -> None:
        """Start tracking ``key``.

        Raises:
            InvalidArgumentError: ``key`` is already tracked (a double insert is a bookkeeping
                bug in the caller, and treating it as a hit would hide it), or ``size`` < 0.
        """
        if key in self._sizes:
            raise InvalidArgumentError(f"key {key!r} is already tracked by the {self.name} policy")
        if size < 0:
            raise InvalidArgumentError(f"block size must be >= 0, got {size}")
        if parent == key:
            parent = None  # a block cannot be its own prefix; treat it as a root
        self._sizes[key] = size
        self._bytes += size
        self._insert(key, size, parent)

    def on_access(self, key: Hashable) -> None:
        """Record a hit on ``key``; a key the policy does not track is ignored."""
        if key in self._sizes:
            self._access(key)

    def on_remove(self, key: Hashable) -> None:
        """Forget ``key`` (deleted, expired, moved); a key the policy does not track is ignored."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self._bytes -= size
            self._remove(key, size)

    def pop_victim(self, skip: SkipFn | None = None) -> Hashable | None:
        """Choose the next victim, stop tracking it and return it.

        Args:
            skip: keys for which it returns True are pinned: never returned, still tracked.

        Returns:
            The victim, or None when nothing is evictable (empty, or every candidate skipped).
            Always terminates, whatever ``skip`` answers.
        """
        key = self._pop(skip)
        if key is not None:
            self._bytes -= self._sizes.pop(key)
        return key

    def victims(self, n_bytes: int, skip: SkipFn | None = None) -> list[Hashable]:
        """Pop victims until their sizes sum to ``>= n_bytes`` or nothing more is evictable.

        The returned keys are already forgotten, as with :meth:`pop_victim`; the caller checks
        the sum itself when a short list matters.
        """
        out: list[Hashable] = []
        freed = 0
        while freed < n_bytes:
            size_before = self._bytes
            key = self.pop_victim(skip)
            if key is None:
                break
            out.append(key)
            freed += size_before - self._bytes
        return out

    def resident(self) -> KeysView[Hashable]:
        """A live, read-only view of the tracked keys: ``key in view`` is a C-level dict lookup,
        for replay loops that test membership millions of times."""
        return self._sizes.keys()

    def size_of(self, key: Hashable) -> int | None:
        """The size ``key`` was inserted with, or None when it is not tracked."""
        return self._sizes.get(key)

    @property
    def bytes(self) -> int:
        """Total size of the tracked blocks."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __repr__(self) -> str:
        return f"<{type(self).__name__} keys={len(self)} bytes={self._bytes}>"

    # ------------------------------------------------------------------- for subclasses only
    def _insert(self, key: Hashable, size: int, parent: Hashable | None) -> None:
        raise NotImplementedError

    def _access(self, key: Hashable) -> None:
        raise NotImplementedError

    def _remove(self, key: Hashable, size: int) -> None:
        """Drop ``key`` (``size`` bytes) from the ordering structures; ``_sizes`` is updated."""
        raise NotImplementedError

    def _pop(self, skip: SkipFn | None) -> Hashable | None:
        """Remove the victim from the ordering structures and return it (``_sizes`` untouched)."""
        raise NotImplementedError
