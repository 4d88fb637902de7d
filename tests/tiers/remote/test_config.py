"""Remote-tier configuration and health tracker: typed errors, defaults, and the gate."""

from __future__ import annotations

import pytest

from tairstore.errors import InvalidArgumentError
from tairstore.tiers.remote import HealthTracker, make_remote_tier, validate_remote_config

MOONCAKE = {"kind": "mooncake", "master": "127.0.0.1:50051",
            "metadata_server": "http://127.0.0.1:8080/metadata"}


def test_defaults_filled_in():
    cfg = validate_remote_config({"kind": "hf3fs", "path": "/mnt/3fs/tairstore"})
    assert cfg["file_bytes"] == 256 << 20 and cfg["capacity_bytes"] == 0
    cfg = validate_remote_config(MOONCAKE)
    assert cfg["protocol"] == "tcp" and cfg["local_hostname"] == "127.0.0.1"


@pytest.mark.parametrize("config, word", [
    ("mooncake", "dict"),
    ({}, "kind"),
    ({"kind": "redis"}, "kind"),
    ({"kind": "hf3fs"}, "'path'"),
    ({"kind": "hf3fs", "path": "/x", "file_size": 1}, "unknown"),
    ({"kind": "hf3fs", "path": "/x", "file_bytes": 10}, "'file_bytes'"),
    ({"kind": "hf3fs", "path": "/x", "file_bytes": True}, "'file_bytes'"),
    ({"kind": "hf3fs", "path": "/x", "retry_s": 0}, "'retry_s'"),
    ({"kind": "hf3fs", "path": "/x", "prefix": "a b"}, "'prefix'"),
    ({**MOONCAKE, "protocol": "udp"}, "'protocol'"),
    ({**MOONCAKE, "master": "nohost"}, "'master'"),
    ({**MOONCAKE, "segment_bytes": "1G"}, "'segment_bytes'"),
    ({"kind": "mooncake", "master": "127.0.0.1:1"}, "'metadata_server'"),
    ({**MOONCAKE, "metrics_url": "127.0.0.1:9003"}, "'metrics_url'"),
    ({**MOONCAKE, "metrics_url": 9003}, "'metrics_url'"),
])
def test_bad_config_is_a_typed_error(config, word):
    with pytest.raises(InvalidArgumentError, match=word):
        make_remote_tier(config)


class FakeClock:
    """Time moved by hand, so the tracker is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_health_tracker_skips_then_probes_then_recovers():
    clock = FakeClock()
    h = HealthTracker(retry_s=2.0, failure_threshold=2, clock=clock)
    assert h.allow() and h.healthy
    h.failure()
    assert h.healthy, "one failure under a threshold of two"
    h.failure()
    assert not h.healthy
    # Unhealthy: calls are refused at once, and counted.
    assert not h.allow() and not h.allow()
    assert h.as_dict()["skipped_calls"] == 2
    clock.now += 2.0
    assert h.allow(), "one probe after retry_s"
    assert not h.allow(), "only one caller gets the probe"
    h.failure()
    clock.now += 1.0
    assert not h.allow(), "a failed probe waits another retry_s"
    clock.now += 1.0
    assert h.allow()
    h.success()
    assert h.healthy and h.allow()
    assert h.as_dict()["health_transitions"] == 2


def test_health_tracker_rejects_bad_arguments():
    with pytest.raises(InvalidArgumentError):
        HealthTracker(retry_s=0)
    with pytest.raises(InvalidArgumentError):
        HealthTracker(failure_threshold=0)
