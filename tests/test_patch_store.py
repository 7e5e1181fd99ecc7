"""PatchStore / ``python -m monai_patchplug.prepare``: idempotent, resumable preparation; PatchQueue on lazy volumes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

import monai_patchplug as mpp
from monai_patchplug import LOCATION, LazyVolume, LoadLazyd, PatchStore
from monai_patchplug.prepare import main as prepare_main

SHAPE = (24, 20, 16)


def _write_cases(folder: Path, n: int, suffix: str = ".nii.gz") -> list[dict]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        image = rng.random(SHAPE).astype(np.float32) * 100
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[4 + i : 12 + i, 5:15, 3:9] = 1
        label[15:18, 2:6, 10:14] = 2
        affine = np.diag([1.0, 1.5, 2.0, 1.0])
        affine[:3, 3] = [i, -3, 5]
        nib.save(nib.Nifti1Image(image, affine), folder / f"img_{i}{suffix}")
        nib.save(nib.Nifti1Image(label, affine), folder / f"seg_{i}{suffix}")
        files.append({"image": str(folder / f"img_{i}{suffix}"), "label": str(folder / f"seg_{i}{suffix}"), "id": i})
    return files


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_prepared_cases_read_back_as_loaded_and_are_skipped_the_second_time(tmp_path):
    files = _write_cases(tmp_path, 2)
    store = PatchStore(tmp_path / "store", chunks=8, workers=1, progress=False)
    prepared = store(files, keys=["image", "label"], label_key="label")
    assert [p["id"] for p in prepared] == [0, 1] and files[0]["image"].endswith(".nii.gz")  # inputs untouched
    load = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"])])
    for item, source in zip(prepared, files):
        lazy, ref = LoadLazyd(["image", "label"])(item), load(source)
        for key in ("image", "label"):
            assert isinstance(lazy[key], LazyVolume) and lazy[key].shape == tuple(ref[key].shape)
            assert np.array_equal(lazy[key][:], ref[key].numpy())
            assert torch.equal(lazy[key].affine, ref[key].affine)
            assert np.array_equal(lazy[key].meta["spatial_shape"], ref[key].meta["spatial_shape"])
            assert lazy[key].meta["filename_or_obj"] == source[key]
        assert lazy["label"].label_index.counts() == {1: 8 * 10 * 6, 2: 3 * 4 * 4}
        assert lazy["image"].label_index is None
        assert lazy["label"].array.chunks == (1, 8, 8, 8)
    before = _mtimes(tmp_path / "store")
    again = store(files, keys=["image", "label"], label_key="label")
    assert again == prepared and _mtimes(tmp_path / "store") == before  # idempotent: nothing rewritten


def test_a_half_written_case_is_redone_and_a_changed_source_too(tmp_path):
    files = _write_cases(tmp_path, 2)
    store = PatchStore(tmp_path / "store", workers=1, progress=False)
    prepared = store(files, keys=["image", "label"], label_key="label")
    case = Path(prepared[0]["image"]).parent
    (case / "done.json").unlink()  # killed before its marker: the data may be partial
    for chunk in (case / "image.zarr").rglob("c/*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    other = _mtimes(Path(prepared[1]["image"]).parent)
    store(files, keys=["image", "label"], label_key="label")
    assert PatchStore.is_prepared(case)
    ref = LoadImaged("image", image_only=True)(files[0])["image"]
    assert np.array_equal(LoadLazyd("image")(prepared[0])["image"][0], ref.numpy())
    assert _mtimes(Path(prepared[1]["image"]).parent) == other  # the finished case was skipped
    marker = json.loads((case / "done.json").read_text())
    assert marker["shapes"] == {"image": [1, *SHAPE], "label": [1, *SHAPE]} and marker["label_key"] == "label"
    os.utime(files[1]["label"], ns=(1, 1))  # a source changed since: its case is redone
    store(files, keys=["image", "label"], label_key="label")
    assert _mtimes(Path(prepared[1]["image"]).parent) != other


def test_a_missing_or_corrupt_file_names_its_case_after_the_others_are_done(tmp_path):
    files = _write_cases(tmp_path, 3)
    files[1]["label"] = str(tmp_path / "missing_seg.nii.gz")
    Path(files[2]["image"]).write_bytes(b"\x1f\x8b not really gzip")
    store = PatchStore(tmp_path / "store", workers=2, progress=False)
    with pytest.raises(RuntimeError, match="2 case") as error:
        store(files, keys=["image", "label"], label_key="label")
    text = str(error.value)
    assert "missing_seg.nii.gz" in text and "img_2.nii.gz" in text and store.case_name(files[1], ["image"]) in text
    assert PatchStore.is_prepared(tmp_path / "store" / store.case_name(files[0], ["image"]))
    with pytest.raises(ValueError, match="label_key"):
        store(files, keys=["image"], label_key="label")
    with pytest.raises(ValueError, match="chunks"):
        PatchStore(tmp_path, chunks=0)


def test_prepare_command_converts_a_datalist(tmp_path):
    files = _write_cases(tmp_path, 2)
    datalist = {"training": [{"image": Path(f["image"]).name, "label": Path(f["label"]).name} for f in files],
                "name": "toy"}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    out = tmp_path / "prepared"
    assert prepare_main([str(tmp_path / "dataset.json"), str(out), "--workers", "1", "--no-progress"]) == 0
    written = json.loads((out / "datalist.json").read_text())
    assert written["name"] == "toy" and len(written["training"]) == 2
    assert all(item["label"].endswith("label.zarr") and Path(item["label"]).exists() for item in written["training"])
    volume = LoadLazyd("label")(written["training"][1])["label"]
    assert volume.label_index is not None and volume.shape == (1, *SHAPE)
    run = subprocess.run(
        [sys.executable, "-m", "monai_patchplug.prepare", str(tmp_path / "nope.json"), str(out), "--no-progress"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0 and "nope.json" in run.stderr


def test_the_index_cap_is_a_setting_of_the_store_and_of_the_command(tmp_path, capsys):
    files = _write_cases(tmp_path, 1)  # label 1: 80 runs of 6 voxels along the last axis; label 2: 12 runs of 4
    prepared = PatchStore(tmp_path / "store", workers=1, progress=False)(files, ["image", "label"], "label")
    case = Path(prepared[0]["label"]).parent
    assert np.diff(LoadLazyd("label")(prepared[0])["label"].label_index.offsets).tolist() == [80, 12]  # exact
    before = _mtimes(case)
    capped = PatchStore(tmp_path / "store", workers=1, progress=False, max_runs_per_label=5)
    assert capped(files, ["image", "label"], "label") == prepared
    assert _mtimes(case) != before  # another cap: the case was prepared again
    index = LoadLazyd("label")(prepared[0])["label"].label_index
    assert np.diff(index.offsets).tolist() == [5, 5] and index.counts() == {1: 5 * 6, 2: 5 * 4}
    assert json.loads((case / "done.json").read_text())["max_runs_per_label"] == 5
    before = _mtimes(case)
    capped(files, ["image", "label"], "label")
    assert _mtimes(case) == before  # the same cap: skipped
    datalist = {"training": [{"image": f["image"], "label": f["label"]} for f in files]}
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    command = [str(tmp_path / "dataset.json"), str(tmp_path / "cli"), "--workers", "1", "--no-progress"]
    assert prepare_main([*command, "--max-runs-per-label", "3"]) == 0
    written = json.loads((tmp_path / "cli" / "datalist.json").read_text())["training"][0]
    assert np.diff(LoadLazyd("label")(written)["label"].label_index.offsets).tolist() == [3, 3]
    assert prepare_main([*command, "--max-runs-per-label", "0"]) == 1
    assert "max_runs_per_label must be None or a positive int, got 0" in capsys.readouterr().err
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError), (False, TypeError)):
        with pytest.raises(error, match=f"PatchStore: max_runs_per_label .*{bad!r}"):
            PatchStore(tmp_path / "store", max_runs_per_label=bad)


def test_patch_queue_on_lazy_volumes_reads_only_its_patches(tmp_path, monkeypatch):
    files = _write_cases(tmp_path, 3)
    prepared = PatchStore(tmp_path / "store", workers=1, progress=False)(files, ["image", "label"], "label")
    read: list[int] = []
    original = LazyVolume.__getitem__

    def counting(self, index):
        box = original(self, index)
        read.append(box.size)
        return box

    monkeypatch.setattr(LazyVolume, "__getitem__", counting)
    sampler = mpp.LabelSampler(8, "label", {0: 1, 1: 1, 2: 1}, keys=["image", "label"])
    queue = mpp.PatchQueue(prepared, 6, 4, sampler, transform=LoadLazyd(["image", "label"]), seed=0)
    batches = list(DataLoader(queue, batch_size=4, num_workers=0))
    assert sum(b["image"].shape[0] for b in batches) == 12
    assert sum(read) == 12 * 2 * 8**3  # image + label boxes of the 12 patches, nothing else (the index drew them)
    for batch in batches:
        centre = batch[LOCATION][:, :3] + 4
        labels = [int(batch["label"][i, 0, 4, 4, 4]) for i in range(len(centre))]
        assert set(labels) <= {0, 1, 2}


def test_patch_queue_lazy_nii_equals_loaded_nii(tmp_path):
    files = _write_cases(tmp_path, 2, suffix=".nii")
    sampler = mpp.LabelSampler(8, "label", {0: 1, 1: 2}, keys=["image", "label"])
    load = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"])])
    lazy_queue = mpp.PatchQueue(files, 8, 4, sampler, transform=LoadLazyd(["image", "label"]), seed=3)
    memory_queue = mpp.PatchQueue(files, 8, 4, sampler, transform=load, seed=3)
    lazy = list(DataLoader(lazy_queue, batch_size=4, num_workers=0))
    memory = list(DataLoader(memory_queue, batch_size=4, num_workers=0))
    assert len(lazy) == len(memory) == 2
    for a, b in zip(lazy, memory):
        assert torch.equal(a[LOCATION], b[LOCATION])
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        assert torch.equal(a["image"].affine, b["image"].affine)


def test_store_of_sparse_cases_is_small(tmp_path):
    """The store is about the size of the .nii.gz files (compressed, chunked); the index a sliver of it."""
    files = _write_cases(tmp_path, 1)
    prepared = PatchStore(tmp_path / "store", chunks=16, workers=1, progress=False)(files, ["image", "label"], "label")
    case = Path(prepared[0]["image"]).parent
    store_bytes = sum(p.stat().st_size for p in case.rglob("*") if p.is_file())
    gz_bytes = sum(Path(files[0][k]).stat().st_size for k in ("image", "label"))
    assert store_bytes < 1.5 * gz_bytes, (store_bytes, gz_bytes)
    assert (case / "label.zarr.index.npz").stat().st_size < 0.5 * math.prod(SHAPE)


def test_without_zarr_the_message_says_what_to_install(tmp_path, monkeypatch):
    files = _write_cases(tmp_path, 1)
    monkeypatch.setitem(sys.modules, "zarr", None)  # import zarr now raises ImportError
    with pytest.raises(RuntimeError, match=r"outofcore"):
        PatchStore(tmp_path / "store", workers=1, progress=False)(files, ["image"])
    (tmp_path / "a.zarr").mkdir()
    with pytest.raises(ImportError, match=r"outofcore"):
        LoadLazyd("x")({"x": str(tmp_path / "a.zarr")})
