"""Interpolation over AIConfigurator-format tables, the compact format, and held-out accuracy."""

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from tairstore.hisim.tables import (
    SPECS, Table, TableError, load_npz, read_aiconfigurator_dir, read_aiconfigurator_table,
    save_npz,
)
from tairstore.hisim.validate import holdout_errors, summary

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
AIC = DATA / "aiconfigurator" / "sglang_0.5.6.post2"
# Issue target for interpolation on held-out points.
MEDIAN_TARGET_PCT = 3.0
# Tables this small (69 all-reduce points) lose whole neighbourhoods to a 20% hold-out; they are
# reported by the benchmark but not held to the target.
MIN_POINTS_FOR_TARGET = 500


def _gemm_table(fn) -> Table:
    keys, axes, lat = [], [], []
    for m in (1, 4, 16, 64, 256, 1024):
        for n in (256, 1024, 4096):
            for k in (512, 2048):
                keys.append(("bfloat16",))
                axes.append((m, n, k))
                lat.append(fn(m, n, k))
    return Table(SPECS["gemm"], keys, np.array(axes, float), np.array(lat))


def test_exact_at_measured_points():
    t = _gemm_table(lambda m, n, k: 1e-3 * m * n * k / 1e6 + 0.01)
    for key, point, lat in zip(t.keys, t.axes, t.latency_ms):
        assert t.lookup(key, *point) == pytest.approx(lat, rel=1e-9)


def test_power_law_is_interpolated_exactly_in_log_space():
    # A pure power law is a plane in log-log space: any interior point comes out exact.
    t = _gemm_table(lambda m, n, k: 1e-9 * m * n ** 0.5 * k)
    for m, n, k in ((3, 700, 1000), (100, 2000, 900), (600, 300, 1500)):
        assert t.lookup(("bfloat16",), m, n, k) == pytest.approx(1e-9 * m * n ** 0.5 * k, rel=1e-6)


def test_noise_is_made_monotone_without_lifting_it():
    # m=2 measured faster than m=1: the isotonic fit averages the two instead of clipping.
    keys = [("bfloat16",)] * 3
    axes = np.array([[1, 64, 64], [2, 64, 64], [4, 64, 64]], float)
    t = Table(SPECS["gemm"], keys, axes, np.array([0.012, 0.010, 0.020]))
    a, b = t.lookup(keys[0], 1, 64, 64), t.lookup(keys[0], 2, 64, 64)
    assert a == pytest.approx(b) == pytest.approx(math.sqrt(0.012 * 0.010))
    assert t.lookup(keys[0], 4, 64, 64) == pytest.approx(0.020)


def test_extrapolation_slope_is_bounded():
    t = _gemm_table(lambda m, n, k: 1e-6 * m * n * k / 1e3 + 0.005)
    big = t.lookup(("bfloat16",), 1024 * 16, 4096, 2048)
    edge = t.lookup(("bfloat16",), 1024, 4096, 2048)
    assert edge < big <= edge * 16 ** 2


def test_unknown_key_raises():
    t = _gemm_table(lambda m, n, k: 1.0)
    with pytest.raises(TableError):
        t.lookup(("fp8",), 1, 1, 1)


def test_reads_gzip_csv_and_roundtrips_npz(tmp_path):
    gemm_dir = tmp_path / "gemm"
    gemm_dir.mkdir()
    rows = ["framework,version,device,op_name,kernel_source,gemm_dtype,m,n,k,latency"]
    for m in (1, 8, 64):
        rows.append(f"SGLang,x,GPU,gemm,sglang,bfloat16,{m},128,256,{0.01 * m}")
    with gzip.open(gemm_dir / "gemm_perf.csv.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    tables = read_aiconfigurator_dir(tmp_path)
    assert set(tables) == {"gemm"}
    save_npz(tables, tmp_path / "t.npz")
    back = load_npz(tmp_path / "t.npz")
    assert back["gemm"].lookup(("bfloat16",), 8, 128, 256) == pytest.approx(0.08, rel=1e-6)


def test_shipped_tables_are_small_and_load():
    from tairstore.hisim.database import DATA_DIR, REFERENCE_SYSTEMS, shipped_tables

    total = sum(p.stat().st_size for p in DATA_DIR.iterdir())
    assert total < 2 * 1024 * 1024
    for system in REFERENCE_SYSTEMS:
        assert "gemm" in shipped_tables(system)


@pytest.mark.skipif(not AIC.exists(), reason="../shared/data not present")
@pytest.mark.parametrize("system", ["h100_sxm", "h200_sxm"])
def test_holdout_interpolation_error(system):
    tables = read_aiconfigurator_dir(AIC / system)
    assert {"gemm", "context_attention", "generation_attention"} <= set(tables)
    for name, table in tables.items():
        median, p90 = summary(holdout_errors(table))
        assert math.isfinite(median), name
        if len(table) >= MIN_POINTS_FOR_TARGET:
            assert median <= MEDIAN_TARGET_PCT, (name, median, p90)


@pytest.mark.skipif(not AIC.exists(), reason="../shared/data not present")
def test_generation_kv_len_counts_cached_and_new_tokens():
    t = read_aiconfigurator_table(AIC / "h100_sxm", SPECS["generation_attention"])
    assert t is not None
    assert t.axes[:, 1].min() == 2  # step 1 (one cached) + isl 1
