"""The ``[tair]`` config section: storages and instance groups created at start, bad values refused."""

from __future__ import annotations

import pytest

from tairstore.daemon.config import load_config
from tairstore.daemon.tair_admin import open_tair_storage
from tairstore.errors import InvalidArgumentError

TOML = """
[tair]
admin_http_port = 6492
root_path = "{root}"

[[tair.storages]]
name = "nfs1"
type = "file"
root_path = "{nfs}"

[[tair.instance_groups]]
name = "team-a"
storages = ["nfs1"]
quota_bytes = "64M"
"""


def test_tair_section_creates_storages_and_groups(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(TOML.format(root=tmp_path / "files", nfs=tmp_path / "nfs"))
    cfg = load_config(path)
    assert cfg.tair.admin_http_port == 6492
    storage = open_tair_storage(cfg.tair, str(tmp_path))
    assert storage.group("team-a")["quota_bytes"] == 64 << 20
    assert storage.storage_configs("team-a") == [{"type": "file", "is_available": True, "global_unique_name": "nfs1",
                                                  "storage_spec": {"root_path": str(tmp_path / "nfs")}}]
    assert storage.storage_configs("default")[0]["storage_spec"]["root_path"] == str(tmp_path / "files")
    # Reopening keeps the tables; an unchanged group keeps its version.
    again = open_tair_storage(cfg.tair, str(tmp_path))
    assert again.group("team-a")["version"] == 1


@pytest.mark.parametrize("body, reason", [
    ('[tair]\nadmin_http_port = 70000', "admin_http_port"),
    ('[tair]\nstorages = [1]', "storages"),
    ('[tair]\nbogus = 1', "unknown option"),
])
def test_tair_section_refuses_bad_values(tmp_path, body, reason):
    path = tmp_path / "t.toml"
    path.write_text(body)
    with pytest.raises(InvalidArgumentError, match=reason):
        load_config(path)


def test_unknown_storage_type_is_refused(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[[tair.storages]]\nname = "x"\ntype = "s3"\n')
    with pytest.raises(InvalidArgumentError, match="type must be one of"):
        open_tair_storage(load_config(path).tair, str(tmp_path))
