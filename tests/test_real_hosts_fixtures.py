"""The real-host fixtures (tests/data/real-hosts/) load and rebuild as sysfs-like trees."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import real_hosts
from real_hosts import CPU_DIR, FAMILIES, build_tree, load, names, policies

from vmpower.cpufreq.detect import present_cpus, system_driver
from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.sysfs import Sysfs

HOSTS = names()


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text()


def test_every_family_has_a_fixture_and_every_fixture_names_its_source():
    families = {load(n)["family"] for n in HOSTS}
    assert set(FAMILIES) <= families
    assert len(HOSTS) == 47  # pepc's 46 hosts and one linux-pm mailing-list dump
    for name in HOSTS:
        path = real_hosts.DATA / f"{name}.json"
        assert path.stat().st_size < 200_000, name
        prov = load(name)["provenance"]
        if name == "imx8qxp-mek":  # transcribed by hand from a post to linux-pm
            assert "linux-pm" in prov["source"] and "Message-ID" in prov["source"]
            continue
        assert prov["repo"] == "https://github.com/intel/pepc"
        assert prov["commit"] and prov["path"] == f"tests/emul-data/{name}/sys/inlinefiles.txt"


def test_one_fixture_directory():
    """Issue #18: one copy of each recorded host, one format, read by every test and by
    `vmpower simulate-sysfs --fixture`."""
    data = real_hosts.DATA.parent
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == ["real-hosts"]
    assert [p.name for p in data.rglob("distill.py")] == ["distill.py"]


def test_unknown_host_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no real-host fixture 'nosuch'"):
        load("nosuch")
    with pytest.raises(ValueError, match="format None, expected 'vmpower-real-host/1'"):
        real_hosts.load_fixture(real_hosts.DATA.parent / "dpdk-22.11-guest.json")


@pytest.mark.parametrize("name", HOSTS)
def test_tree_looks_like_sysfs(tmp_path, name):
    fixture = load(name)
    root = build_tree(fixture, tmp_path, cpus=6)
    kept = real_hosts.kept_policies(fixture, 6)
    kept_cpus = sorted(c for cs in kept.values() for c in cs)
    assert read(root, f"{CPU_DIR}/present") == format_cpu_list(kept_cpus) + "\n"
    policy_names = sorted(os.listdir(root / CPU_DIR / "cpufreq"))
    assert sorted(p for p in policy_names if p.startswith("policy")) == sorted(
        f"policy{p}" for p in kept
    )
    for pol, cpus in kept.items():
        pdir = root / CPU_DIR / "cpufreq" / f"policy{pol}"
        shape = real_hosts.shape_of(fixture, pol)
        for file, value in shape["files"].items():
            assert read(pdir, file) == value + "\n"  # trailing spaces kept, as printed
        assert parse_cpu_list(read(pdir, "related_cpus").strip().replace(" ", ",")) == set(cpus)
        for cpu in cpus:
            link = root / CPU_DIR / f"cpu{cpu}" / "cpufreq"
            assert link.is_symlink()
            assert os.readlink(link) == f"../cpufreq/policy{pol}"  # relative, as the kernel
            assert link.resolve() == pdir.resolve()
            for file, value in (shape.get("acpi_cppc") or {}).items():
                assert read(root, f"{CPU_DIR}/cpu{cpu}/acpi_cppc/{file}") == value + "\n"
        lo, hi = (int(read(pdir, f"scaling_{x}_freq")) for x in ("min", "max"))
        if "scaling_cur_freq" in shape["volatile_files"]:
            assert lo <= int(read(pdir, "scaling_cur_freq")) <= hi
        assert not (pdir / "stats").exists()
    # vmpower's own readers find the CPUs and the driver through the links
    sysfs = Sysfs(root)
    assert present_cpus(sysfs) == kept_cpus
    assert system_driver(sysfs, kept_cpus) == fixture["driver"]


def test_whole_host_tree_has_every_policy_and_the_hybrid_core_types(tmp_path):
    fixture = load("mtl-m-2")
    root = build_tree(fixture, tmp_path)
    assert len(policies(fixture)) == 14
    assert read(root, f"{CPU_DIR}/online") == "0-13\n"
    assert not (root / CPU_DIR / "cpu0/online").exists()  # the boot CPU: none recorded
    assert read(root, f"{CPU_DIR}/cpu13/online") == "1\n"
    assert read(root, "devices/cpu_core/cpus") == "0-3\n"
    assert read(root, "devices/cpu_atom/cpus") == "4-13\n"
    # Meteor Lake's LP E-cores: base_frequency is the minimum (issue #18 point 6)
    lp = root / CPU_DIR / "cpu13/cpufreq"
    assert read(lp, "base_frequency") == read(lp, "cpuinfo_min_freq") == "400000\n"


def test_truncation_keeps_whole_policies_and_global_files(tmp_path):
    fixture = load("rome0")
    root = build_tree(fixture, tmp_path, cpus=3)
    assert read(root, f"{CPU_DIR}/online") == "0-2\n"
    assert read(root, f"{CPU_DIR}/cpufreq/boost") == "1\n"
    # the _PSD domain is recorded as the host has it, SMT sibling included
    assert read(root, f"{CPU_DIR}/cpufreq/policy0/freqdomain_cpus") == "0 128\n"
    assert not (root / CPU_DIR / "cpu3").exists()
    with pytest.raises(ValueError, match="at least 1"):
        build_tree(fixture, tmp_path / "other", cpus=0)


@pytest.mark.parametrize(
    "name", [n for n in HOSTS if "intel_pstate/turbo_pct" in load(n)["global"]]
)
def test_turbo_pct_and_num_pstates_give_the_nonturbo_maximum(name):
    """Issue #18 points 2-3: without base_frequency (intel_cpufreq) the kernel's
    turbo_pct/num_pstates still give the highest non-turbo frequency: it equals
    base_frequency on every HWP host and the model name's rated frequency on the others."""
    fixture = load(name)
    shape = fixture["shapes"][0]["files"]
    lo, hi = int(shape["cpuinfo_min_freq"]), int(shape["cpuinfo_max_freq"])
    assert int(fixture["global"]["intel_pstate/num_pstates"]) == (hi - lo) // 100_000 + 1
    (derived,) = real_hosts.nonturbo_max_khz(fixture)
    if "base_frequency" in shape:
        assert derived == int(shape["base_frequency"])
    else:
        rated = re.search(r"@ (\d+\.\d+)GHz", fixture["cpu"]["model_name"])
        assert rated is not None
        assert derived == round(float(rated.group(1)) * 1_000_000)
