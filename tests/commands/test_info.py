"""gpuloader info: numbers against a brute-force recount, text, JSON and plot outputs."""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from gpuloader.commands import info
from gpuloader.errors import DatasetLayoutError
from gpuloader.format import layout
from support.generated import generate_small as _generate
from support.tiny_dataset import write_tiny_dataset


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _generate(tmp_path_factory.mktemp("gen_info"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_info"), max_level=1)


def _recount(ds: Path, rays: Path) -> dict:
    """Everything info reports, recomputed the slow way: full loads and subdivision maps."""
    per_level: dict[int, dict] = defaultdict(
        lambda: {"sub_volumes": 0, "ray_files": 0, "rays": 0, "hits": 0, "occ": []}
    )
    for p in ds.rglob("*.npz"):
        level = 0 if p.name == "level_0.npz" else int(p.parent.parent.name.split("_")[1])
        grid = np.load(p)["voxels"]
        per_level[level]["sub_volumes"] += 1
        per_level[level]["occ"].append(grid.mean())
    for p in rays.rglob("*_rays.npz"):
        level = int(p.parent.parent.name.split("_")[1])
        with np.load(p) as f:
            per_level[level]["ray_files"] += 1
            per_level[level]["rays"] += len(f["origins"])
            per_level[level]["hits"] += int(f["hits"].sum())
    # leakage from the subdivision maps and voxel contents, not from splits.json's usage
    splits = json.loads((ds / "splits.json").read_text())["object_splits"]
    users: dict[str, set[str]] = defaultdict(set)
    trivial = set()
    for m in ds.glob("objects/object_*/subdivision_map.json"):
        for rec in json.loads(m.read_text()):
            users[rec["hash"]].add(splits[rec["object_id"]])
            grid = np.load(layout.voxel_path(ds, rec["level"], rec["hash"]))["voxels"]
            if not grid.any():  # trivial = all-empty, as upstream's pipeline lists them
                trivial.add(rec["hash"])
    leaks = {
        f"{a}-{b}": sum(1 for h, s in users.items() if h not in trivial and {a, b} <= s)
        for a, b in itertools.combinations(("train", "val", "test"), 2)
    }
    per_split = defaultdict(int)
    for s in splits.values():
        per_split[s] += 1
    return {"levels": dict(per_level), "leaks": leaks, "per_split": dict(per_split)}


@pytest.mark.parametrize("which", ["generated", "tiny"])
def test_numbers_match_brute_force(which, request):
    ds, rays = request.getfixturevalue(which)
    got = info.dataset_info(ds, rays)
    want = _recount(ds, rays)
    assert {r["level"] for r in got["levels"]} == set(want["levels"])
    for row in got["levels"]:
        w = want["levels"][row["level"]]
        for key in ("sub_volumes", "ray_files", "rays", "hits"):
            assert row[key] == w[key], (row["level"], key)
        assert row["hit_rate"] == pytest.approx(w["hits"] / w["rays"])
        assert row["occupancy"] == pytest.approx(np.mean(w["occ"]))
    assert got["leakage"]["pairs"] == want["leaks"]
    assert {k: v for k, v in got["objects_per_split"].items() if v} == want["per_split"]
    assert got["totals"]["rays"] == sum(w["rays"] for w in want["levels"].values())
    assert got["unreadable_files"] == []


def test_tiny_dataset_known_leaks(tiny):
    """The hand-made dataset leaks one block per split pair (A, D, H), and the full block F
    (an ordinary sample, not trivial) is used by all three splits."""
    got = info.dataset_info(*tiny)
    assert got["leakage"]["pairs"] == {"train-val": 2, "train-test": 2, "val-test": 2}
    assert got["leakage"]["leaked_hashes"] == 4
    assert got["leakage"]["matches"] is True  # its statistics state the same counts
    assert got["objects_per_split"] == {"train": 2, "val": 2, "test": 1}


def test_claimed_leakage_is_compared(generated, tmp_path):
    ds, rays = generated
    got = info.dataset_info(ds, rays)
    assert got["leakage"]["matches"] is True
    copy = Path(shutil.copytree(ds, tmp_path / "dataset"))
    doc = json.loads((copy / "splits.json").read_text())
    doc["statistics"]["leaked_hashes_per_split_pair"]["train-val"] += 5
    (copy / "splits.json").write_text(json.dumps(doc))
    bad = info.dataset_info(copy, rays)
    assert bad["leakage"]["matches"] is False
    assert "disagree" in info.format_info(bad)


def test_ray_count_from_header_only(generated):
    ds, rays = generated
    p = next(iter(rays.glob("level_1/*/*_rays.npz")))
    with zipfile.ZipFile(p) as zf:
        shape = info.npy_member_shape(zf, "origins.npy")
        vshape = info.npy_member_shape(zf, "view_positions.npy")
    with np.load(p) as f:
        assert shape == f["origins"].shape
        assert vshape == f["view_positions"].shape


def test_text_table_is_aligned(generated):
    text = info.format_info(info.dataset_info(*generated))
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("level"))
    rule = lines[header + 1]
    assert set(rule.replace(" ", "")) == {"-"}
    rows = []
    for line in lines[header + 2 :]:
        if not line or line.startswith("(") or line.startswith("all"):
            break
        rows.append(line)
    assert rows
    # right-aligned numeric columns end where the rule's dashes end
    ends = [
        i + 1 for i, c in enumerate(rule) if c == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")
    ]
    for row in rows:
        for end in ends[2:]:
            assert row[end - 1] != " ", row


def test_cli_json_and_plot(generated, tmp_path, capsys):
    ds, rays = generated
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    png, js = tmp_path / "out" / "info.png", tmp_path / "info.json"
    rc = info.run(parser.parse_args([str(ds), str(rays), "--plot", str(png), "--json", str(js)]))
    assert rc == 0
    out = capsys.readouterr().out
    assert "train-test" in out and "hit rate" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    doc = json.loads(js.read_text())
    assert doc == json.loads(json.dumps(info.dataset_info(ds, rays)))


def test_missing_splits_json(tmp_path):
    ds, rays = write_tiny_dataset(tmp_path, max_level=1)
    (ds / "splits.json").unlink()
    with pytest.raises(DatasetLayoutError, match="splits.json"):
        info.dataset_info(ds, rays)
    from gpuloader.commands.cli import main

    assert main(["info", str(ds), str(rays)]) == 2


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"object_splits": {"0000": "tr', "not valid JSON"),
        ("[1, 2]", r"not a JSON object \(got list\)"),
        ('{"object_splits": ["0000"]}', r"'object_splits' is not a JSON object \(got list\)"),
        (
            '{"object_splits": {}, "hash_object_usage": 3}',
            r"'hash_object_usage' is not a JSON object \(got int\)",
        ),
        (b"\xff\xfe{", "not valid JSON"),
    ],
)
def test_damaged_splits_json_is_one_named_line(tmp_path, capsys, content, says):
    """A truncated or mangled splits.json: DamagedFileError naming the file, and from the
    command one error line (exit 2), not a JSONDecodeError traceback."""
    from gpuloader.commands.cli import main
    from gpuloader.errors import DamagedFileError

    ds, rays = write_tiny_dataset(tmp_path, max_level=1)
    path = ds / "splits.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DamagedFileError, match=says) as got:
        info.dataset_info(ds, rays)
    assert str(got.value).startswith(f"{path}: ")
    assert main(["info", str(ds), str(rays)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gpuloader info: error: {got.value}"]


def test_damaged_ray_file_is_listed_not_fatal(tmp_path):
    ds, rays = write_tiny_dataset(tmp_path, max_level=1)
    bad = next(iter(sorted(rays.glob("level_1/*/*_rays.npz"))))
    bad.write_bytes(b"junk")
    got = info.dataset_info(ds, rays)
    assert got["unreadable_files"] == [str(bad)]
    assert "gpuloader verify" in info.format_info(got)


def test_table_per_split_and_level(tiny):
    """Per split and level: a sample counts in each split whose objects use it (the dataset's
    rule), trivial blocks (E, F) in every split; numbers recounted from full loads."""
    ds, rays = tiny
    got = info.dataset_info(ds, rays)
    rows = {(r["split"], r["level"]): r for r in got["per_split"]}
    splits = json.loads((ds / "splits.json").read_text())
    # blocks per split at level 1 (see _tiny_dataset.OBJECTS): train A B C D E F, val A G H E
    # F, test H D E F
    assert {s: rows[(s, 1)]["sub_volumes"] for s in ("train", "val", "test")} == {
        "train": 6,
        "val": 5,
        "test": 4,
    }
    assert {s: rows[(s, 0)]["objects"] for s in ("train", "val", "test")} == got[
        "objects_per_split"
    ]
    for (s, level), row in rows.items():
        if level == "all":
            parts = [r for (s2, lv), r in rows.items() if s2 == s and lv != "all"]
            assert row["rays"] == sum(r["rays"] for r in parts)
            continue
        owned = []
        for p in sorted(rays.glob(f"level_{level}/*/*_rays.npz")):
            name = p.name[: -len("_rays.npz")]
            if level == 0:
                users = {splits["object_splits"][name]}
            elif name in splits["trivial_hashes"]:
                users = {"train", "val", "test"}
            else:
                users = set(splits["hash_object_usage"][name].values())
            if s in users:
                owned.append(p)
        assert row["ray_files"] == len(owned), (s, level)
        want_rays = want_hits = 0
        for p in owned:
            with np.load(p) as f:
                want_rays += len(f["origins"])
                want_hits += int(f["hits"].sum())
        assert (row["rays"], row["hits"]) == (want_rays, want_hits), (s, level)
    text = info.format_info(got)
    assert "split  level  objects  sub-volumes" in text


def _forge_rows(path: Path, rows: int) -> None:
    """Rewrite a ray file so its 'origins' header claims ``rows`` rows (the data unchanged)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, a in arrays.items():
            shape = (rows, 3) if key == "origins" else a.shape
            header = {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False}
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array_header_1_0(f, {**header, "shape": shape})
                f.write(np.ascontiguousarray(a).tobytes())


def test_forged_ray_count_is_a_damaged_file_not_a_figure(tmp_path):
    """A header claiming 10^12 rays is listed with its reason; the totals leave it out."""
    ds, rays = write_tiny_dataset(tmp_path, max_level=1)
    clean = info.dataset_info(ds, rays)
    bad = next(iter(sorted(rays.glob("level_1/*/*_rays.npz"))))
    with np.load(bad) as z:
        n = len(z["origins"])
    _forge_rows(bad, 10**12)
    got = info.dataset_info(ds, rays)
    assert got["totals"]["rays"] == clean["totals"]["rays"] - n
    assert [p["file"] for p in got["problems"]] == [str(bad)]
    assert "declares" in got["problems"][0]["error"]
    text = info.format_info(got)
    assert f"  {bad}: " in text and "1,000,000,000" not in text


def test_layout_problems_are_listed(tmp_path):
    """A ray folder that is a symlink loop and a ray file whose voxel file is missing: info
    names both (the readers leave both out) instead of saying nothing."""
    ds, rays = write_tiny_dataset(tmp_path, max_level=1)
    level1 = sorted(rays.glob("level_1/*/*_rays.npz"))
    loop = level1[0].parent
    shutil.rmtree(loop)
    loop.symlink_to(loop.name)
    victim = next(p for p in level1 if p.parent != loop)
    name = victim.name[: -len("_rays.npz")]
    voxel = layout.voxel_path(ds, 1, name)
    voxel.unlink()
    got = info.dataset_info(ds, rays)
    by_file = {p["file"]: p["error"] for p in got["problems"]}
    assert set(by_file) == {str(loop), str(voxel)}
    assert "cannot be listed" in by_file[str(loop)] and "missing" in by_file[str(voxel)]
    text = info.format_info(got)
    assert f"  {loop}: " in text and f"  {voxel}: voxel file missing" in text
