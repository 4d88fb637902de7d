"""The daemon's TOML config: every section, sizes, defaults, and refusals that name file, key and
reason."""

from __future__ import annotations

import textwrap

import pytest

from tairstore.daemon.main import choose_sizes
from tairstore.daemon.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_HTTP_PORT,
    DEFAULT_PORT,
    DaemonConfig,
    is_loopback,
    load_config,
    parse_size,
)
from tairstore.errors import InvalidArgumentError

TOKEN = "t" * 32


def write(tmp_path, text: str):
    p = tmp_path / "tairstore.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == DaemonConfig()
    assert (cfg.host, cfg.port, cfg.http_port, cfg.data_dir) == ("127.0.0.1", DEFAULT_PORT,
                                                                 DEFAULT_HTTP_PORT, DEFAULT_DATA_DIR)
    assert cfg.tokens == [] and cfg.namespaces == {} and cfg.store == {}
    assert cfg.limits.data_limits() == {}  # the data server keeps its own defaults


def test_every_section(tmp_path):
    p = write(tmp_path, f"""
        [server]
        host = "0.0.0.0"
        port = 9000
        http_port = 0
        data_dir = "/srv/kv"
        shutdown_grace_s = 3

        [store]
        dram_bytes = "4GiB"
        ssd_bytes = 68719476736
        durability = "batch"
        batch_interval_ms = 10
        segment_bytes = "128MiB"
        compression = "zstd"
        zstd_level = 5
        verify_dram_reads = true
        promote_on = "first"
        policy = {{ dram = "lru", ssd = "lru" }}

        [limits]
        max_frame_bytes = "80MiB"
        max_batch = 512
        max_inflight = 32
        worker_threads = 6
        http_max_body_bytes = "16MiB"

        [[tokens]]
        token = "{TOKEN}"
        namespaces = ["team-a", "team-b"]
        role = "user"

        [[tokens]]
        token = "{'a' * 20}"
        namespaces = "*"
        role = "admin"

        [namespaces.team-a]
        total_bytes = "10GiB"
        tier_bytes = {{ dram = "2GiB", ssd = "8GiB" }}

        [namespaces.team-b]
    """)
    cfg = load_config(p)
    assert (cfg.host, cfg.port, cfg.http_port, cfg.data_dir, cfg.shutdown_grace_s) == (
        "0.0.0.0", 9000, 0, "/srv/kv", 3.0)
    assert cfg.store["dram_bytes"] == 4 << 30 and cfg.store["ssd_bytes"] == 64 << 30
    assert cfg.store["segment_bytes"] == 128 << 20 and cfg.store["compression"] == "zstd"
    assert cfg.store["durability"] == "batch" and cfg.store["verify_dram_reads"] is True
    assert cfg.store["policy"] == {"dram": "lru", "ssd": "lru"}
    assert cfg.limits.data_limits() == {"max_frame_bytes": 80 << 20, "max_batch": 512,
                                        "max_inflight": 32, "worker_threads": 6}
    assert cfg.limits.http_max_body_bytes == 16 << 20
    assert [(t.role, t.namespaces) for t in cfg.tokens] == [("user", ("team-a", "team-b")), ("admin", "*")]
    assert cfg.namespaces["team-a"].total_bytes == 10 << 30
    assert cfg.namespaces["team-a"].tier_bytes == {"dram": 2 << 30, "ssd": 8 << 30}
    assert cfg.namespaces["team-b"].total_bytes is None
    assert cfg.source == str(p)


def test_compression_none_spelled_as_string(tmp_path):
    assert load_config(write(tmp_path, '[store]\ncompression = "none"\n')).store["compression"] is None


@pytest.mark.parametrize("text,value", [
    (4096, 4096), ("4096", 4096), ("4K", 4096), ("4KiB", 4096), ("4kb", 4000), ("1.5GiB", 3 << 29),
    ("512M", 512 << 20), ("2 GiB", 2 << 30), ("1TB", 10**12), ("0", 0),
])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1", -5, "1.5", "4 XB", True, 1.5, None])
def test_bad_sizes(text):
    with pytest.raises(InvalidArgumentError):
        parse_size(text)


@pytest.mark.parametrize("body,where,reason", [
    ("[serve]\nport = 1\n", "[serve]", "unknown section"),
    ("[server]\nprot = 1\n", "[server] prot", "unknown option"),
    ("[server]\nport = 70000\n", "[server] port", "port number"),
    ("[server]\nport = \"7480\"\n", "[server] port", "port number"),
    ("[server]\nhost = 1\n", "[server] host", "address"),
    ("[store]\ndram_bytes = \"lots\"\n", "[store] dram_bytes", "size"),
    ("[store]\ndurability = \"fast\"\n", "[store] durability", "sync"),
    ("[store]\ncompression = \"lz4\"\n", "[store] compression", "zstd"),
    ("[store]\nsegment_bytes = 100\n", "[store] segment_bytes", "4096"),
    ("[store]\nverify_dram_reads = 1\n", "[store] verify_dram_reads", "true or false"),
    ("[store]\npolicy = \"random-ish\"\n", "[store] policy", "policy"),
    ("[store]\nfs = \"x\"\n", "[store] fs", "unknown option"),
    ("[limits]\nmax_batch = 0\n", "[limits] max_batch", ">= 1"),
    ("[limits]\nmax_frames = 1\n", "[limits] max_frames", "unknown option"),
    ("[[tokens]]\ntoken = \"short\"\n", "[tokens #1] token", "16 characters"),
    (f"[[tokens]]\ntoken = \"{TOKEN}\"\nrole = \"root\"\n", "[tokens #1] role", "admin"),
    (f"[[tokens]]\ntoken = \"{TOKEN}\"\nnamespaces = []\n", "[tokens #1] namespaces", "list"),
    (f"[[tokens]]\ntoken = \"{TOKEN}\"\nscope = 1\n", "[tokens #1] scope", "unknown option"),
    (f"[[tokens]]\ntoken = \"{TOKEN}\"\n[[tokens]]\ntoken = \"{TOKEN}\"\n", "[tokens #2] token", "twice"),
    ("[tokens]\ntoken = 1\n", "[tokens]", "[[tokens]]"),
    ("[namespaces.a]\ntotal = 1\n", "[namespaces.a] total", "unknown option"),
    ("[namespaces.a]\ntier_bytes = { tape = 1 }\n", "[namespaces.a] tier_bytes.tape", "unknown tier"),
    ("[namespaces.a]\ntotal_bytes = \"1 lot\"\n", "[namespaces.a] total_bytes", "size"),
    ("[store]\ndram_partitions = 1\n", "[store] dram_partitions", "one table per partition"),
    ("[store.dram_partitions.a]\nbytes = \"1 lot\"\nnamespaces = [\"x\"]\n",
     "[store] dram_partitions.a.bytes", "size"),
    ("[store]\ndram_bytes = \"1GiB\"\n[store.dram_partitions.a]\nbytes = \"2GiB\"\nnamespaces = [\"x\"]\n",
     "[store] dram_partitions", "leaves nothing"),
    ("[store.dram_partitions.a]\nbytes = \"1MiB\"\n", "[store] dram_partitions", "namespaces"),
])
def test_refusals_name_file_key_and_reason(tmp_path, body, where, reason):
    p = write(tmp_path, body)
    with pytest.raises(InvalidArgumentError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}: {where}:"), msg
    assert reason in msg, msg


def test_dram_partitions_take_sizes_and_groups(tmp_path):
    cfg = load_config(write(tmp_path, '[store]\ndram_bytes = "8GiB"\n'
                                      '[store.dram_partitions.team-a]\nbytes = "2GiB"\n'
                                      'namespaces = ["a1", "a2"]\ngroup = "gpu-a"\n'))
    assert cfg.store["dram_partitions"] == {"team-a": {"bytes": 2 << 30, "namespaces": ["a1", "a2"],
                                                       "group": "gpu-a"}}


def test_not_toml_and_missing_file(tmp_path):
    p = write(tmp_path, "[server\n")
    with pytest.raises(InvalidArgumentError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(InvalidArgumentError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_sizes_are_chosen_when_left_out(tmp_path):
    opts, how = choose_sizes(str(tmp_path / "new" / "dir"), {})
    assert 64 << 20 <= opts["dram_bytes"] <= 8 << 30
    assert 256 << 20 <= opts["ssd_bytes"] <= 64 << 30
    assert "available memory" in how and "free disk" in how
    opts, how = choose_sizes(str(tmp_path), {"dram_bytes": 1 << 20, "ssd_bytes": 0})
    assert opts["dram_bytes"] == 1 << 20 and opts["ssd_bytes"] == 0
    assert "configured" in how and "volatile" in how


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
