import gzip
import importlib.resources
import io
import json
import logging
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from scaling.data import (DataConfig, LatentDataset, build_dataset, center_crop_arr, decode_latents, describe,
                          load_animal_mnist, load_image, load_vae, random_flip, restricted_load)
from scaling.encode import EncodeConfig, encode_latents
from scaling.encode import main as encode_main


def _raw_animal_images():
    path = importlib.resources.files("animal_mnist").joinpath("data", "Animal_MNIST", "animal_data_version_3.gz")
    with path.open("rb") as f:
        return restricted_load(gzip.GzipFile(fileobj=f))


# ----------------------------------------------------------------------------- embedded datasets


def test_animal_mnist_full_set():
    ds = build_dataset(DataConfig(name="animal_mnist", image_size=32))
    assert len(ds) == 10_000 and ds.num_classes == 10 and ds.channels == 1 and ds.input_size == 32
    assert ds.name == "animal_mnist" and ds.class_names[0] == "bear" and ds.class_names[-1] == "zebra"
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0  # silhouettes: pure background and pure foreground exist
    assert torch.bincount(ds.y, minlength=10).tolist() == [1000] * 10
    assert ds.y.dtype == torch.int64
    # the classes differ: per-class mean brightness is not one number (labels are not shuffled noise)
    means = torch.stack([ds.x[ds.y == c].mean() for c in range(10)])
    assert means.max() - means.min() > 0.1


def test_animal_mnist_resize_matches_pil_bilinear():
    """Antialiased bilinear downsampling agrees with PIL's bilinear resize, an independent implementation."""
    raw = _raw_animal_images()  # (10000, 28, 28) uint8
    assert raw.shape == (10_000, 28, 28) and raw.dtype == np.uint8
    ds = load_animal_mnist(16, max_images=40)
    idx = np.arange(40) * 10_000 // 40
    ref = np.stack([np.asarray(Image.fromarray(raw[i].astype(np.float32)).resize((16, 16), Image.BILINEAR))
                    for i in idx]) / 255 * 2 - 1
    np.testing.assert_allclose(ds.x[:, 0].numpy(), ref, atol=1e-5)
    # at the native size the values are the grey levels mapped to [-1, 1] exactly
    native = load_animal_mnist(28, max_images=40)
    np.testing.assert_allclose(native.x[:, 0].numpy(), raw[idx] / 255 * 2 - 1, atol=1e-6)


def test_max_images_keeps_class_balance():
    ds = build_dataset(DataConfig(name="animal_mnist", image_size=8, max_images=100))
    assert len(ds) == 100 and torch.bincount(ds.y, minlength=10).tolist() == [10] * 10


def test_digits():
    from sklearn.datasets import load_digits

    ds = build_dataset(DataConfig(name="digits", image_size=16))
    assert len(ds) == 1797 and ds.num_classes == 10 and ds[5][0].shape == (1, 16, 16)
    assert -1.0 <= ds.x.min() and ds.x.max() <= 1.0
    native = build_dataset(DataConfig(name="digits", image_size=8))
    ref = load_digits()
    np.testing.assert_allclose(native.x[:, 0].numpy(), ref.images / 16 * 2 - 1, atol=1e-6)
    assert native.y.tolist() == ref.target.tolist()


# ----------------------------------------------------------------------------- restricted unpickler


class _Exploit:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_restricted_unpickler_rejects_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(f"touch {marker}"))
    with pytest.raises(pickle.UnpicklingError, match=r"forbidden global (posix|os|nt)\.system"):
        restricted_load(io.BytesIO(payload))
    assert not marker.exists()
    # a numpy array smuggling a callable in an object dtype is refused too
    with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
        restricted_load(io.BytesIO(pickle.dumps(np.array([print], dtype=object))))
    with pytest.raises(pickle.UnpicklingError, match="numeric numpy array"):
        restricted_load(io.BytesIO(pickle.dumps(np.array([1, "a"], dtype=object))))


def test_restricted_unpickler_reads_plain_arrays():
    for arr in (np.arange(12, dtype=np.int64).reshape(3, 4), np.linspace(0, 1, 7, dtype=np.float32),
                np.zeros((2, 5, 5), dtype=np.uint8)):
        for protocol in (2, 4, 5):
            out = restricted_load(io.BytesIO(pickle.dumps(arr, protocol=protocol)))
            assert out.dtype == arr.dtype and np.array_equal(out, arr)


# ----------------------------------------------------------------------------- image folders


def _write_folder(root, classes=("cat", "ant"), per_class=3, size=(40, 32)):
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rng = np.random.default_rng(ci * 10 + k)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    return root


def test_center_crop_matches_torchvision_resize_crop():
    """Without BOX halving (short side < 2 x size), ADM's crop is Resize(short side, BICUBIC) + CenterCrop."""
    from torchvision import transforms

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (18, 24, 3), dtype=np.uint8))  # 24 wide, 18 high
    ref = transforms.Compose([transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(16)])(im)
    out = center_crop_arr(im, 16)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, np.asarray(ref))


def test_center_crop_known_values():
    """64x48 image, blue with a red 16x16 center square: halved once (BOX) to 32x24, bicubic to 21x16, cropped."""
    arr = np.zeros((48, 64, 3), dtype=np.uint8)
    arr[..., 2] = 255
    arr[16:32, 24:40] = (255, 0, 0)
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    # the red square x 24..40, y 16..32 -> halved: x 12..20, y 8..16 -> scaled by 21/32, 16/24: x 7.9..13.1,
    # y 5.3..10.7 -> cropped 2 columns off the left: x 5.9..11.1; pixel centres inside: rows 5..10, cols 6..10
    assert tuple(out[8, 8]) == (255, 0, 0)
    for y, x in ((0, 0), (0, 15), (15, 0), (15, 15), (8, 2), (8, 14), (2, 8), (14, 8)):
        assert tuple(out[y, x]) == (0, 0, 255), (y, x)
    red = out[..., 0] > 127
    rows, cols = np.nonzero(red)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 10, 6, 10)
    # a flat image stays exactly flat
    flat = center_crop_arr(Image.new("RGB", (100, 37), (10, 200, 30)), 16)
    assert flat.shape == (16, 16, 3) and (flat == (10, 200, 30)).all()


def test_image_folder_classes_labels_and_values(tmp_path):
    root = _write_folder(tmp_path / "data")
    (root / "cat" / "notes.txt").write_text("not an image")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(root / "cat" / "UPPER.PNG")
    cfg = DataConfig(name="image_folder", path=str(root), image_size=16)
    assert describe(cfg) == {"in_channels": 3, "input_size": 16, "num_classes": 2, "pixel_space": True}
    ds = build_dataset(cfg)
    assert ds.class_names == ("ant", "cat") and ds.num_classes == 2 and ds.channels == 3
    assert len(ds) == 7 and ds.labels == [0, 0, 0, 1, 1, 1, 1]
    assert ds.files[3].name == "0.png" and ds.files[-1].name == "UPPER.PNG"
    x, y = ds[6]
    assert x.shape == (3, 16, 16) and y == 1 and torch.equal(x, torch.ones(3, 16, 16))
    x0, _ = ds[0]  # (C, H, W) in [-1, 1], from the HWC uint8 crop
    crop = center_crop_arr(Image.open(root / "ant" / "0.png").convert("RGB"), 16)
    torch.testing.assert_close(x0, torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    assert x0.std() > 0.1


def test_image_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    for fn in (describe, build_dataset):
        with pytest.raises(ValueError, match=f"data.path='{missing}' does not exist"):
            fn(DataConfig(name="image_folder", path=str(missing)))
    with pytest.raises(ValueError, match="data.path is required"):
        describe(DataConfig(name="image_folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"data.path='{empty}' has no class folders"):
        describe(DataConfig(name="image_folder", path=str(empty)))
    (empty / "dog").mkdir()
    (empty / "dog" / "readme.txt").write_text("x")
    for fn in (describe, build_dataset):
        with pytest.raises(ValueError, match=f"data.path='{empty}' holds no images|class folder 'dog' holds no"):
            fn(DataConfig(name="image_folder", path=str(empty)))
    with pytest.raises(ValueError, match=r"data.name='mnist'; allowed: animal_mnist, digits, image_folder, latents"):
        describe(DataConfig(name="mnist"))
    with pytest.raises(ValueError) as err:
        describe(DataConfig(name="image_folder", path=str(missing)))
    assert "\n" not in str(err.value)


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    root = _write_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    (root / "a" / "1.png").write_bytes(b"\x00garbage, not a png" * 10)
    ds = build_dataset(DataConfig(name="image_folder", path=str(root), image_size=8))
    assert ds.num_corrupt == 0  # the first image is fine: build only checks that the folder is readable
    with caplog.at_level(logging.WARNING, logger="scaling.data"):
        items = [ds[i] for i in range(len(ds))] + [ds[1]]
    assert ds.num_corrupt == 1
    assert len([r for r in caplog.records if "1.png" in r.getMessage()]) == 1  # logged once
    assert str(root / "a" / "1.png") in caplog.text
    # index 1 (corrupt) is replaced by the next readable image, index 2 (class b), label included
    assert torch.equal(items[1][0], items[2][0]) and items[1][1] == 1
    assert all(x.shape == (3, 8, 8) for x, _ in items)


def test_unreadable_folder_fails_at_build(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for k in range(3):
        (root / "a" / f"{k}.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=f"data.path='{root}': none of the first 3 images can be read"):
        build_dataset(DataConfig(name="image_folder", path=str(root), image_size=8))


# ----------------------------------------------------------------------------- latents


def test_encode_latents_roundtrip(tmp_path, tiny_vae_dir):
    root = _write_folder(tmp_path / "images", classes=("zebra", "ant"), per_class=3, size=(40, 32))
    cfg = EncodeConfig(path=str(root), out=str(tmp_path / "latents"), image_size=16, vae=tiny_vae_dir, batch_size=4,
                       num_workers=0, device="cpu")
    out = encode_latents(cfg)
    assert sorted(os.listdir(tmp_path)) == ["images", "latents"]  # no temporary directory left
    meta = json.loads((out / "meta.json").read_text())
    assert meta["image_size"] == 16 and meta["latent_size"] == 2 and meta["count"] == 6 and meta["channels"] == 4
    assert meta["class_names"] == ["ant", "zebra"] and meta["vae"] == tiny_vae_dir
    assert meta["latent_scale"] == 0.18215 and meta["num_corrupt"] == 0
    z = np.load(out / "latents.npy")
    assert z.shape == (6, 4, 2, 2) and z.dtype == np.float16
    assert np.load(out / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1]

    # the cache holds mean x scale of each image and of its mirror image (independent re-encoding)
    vae = load_vae(tiny_vae_dir)
    files = sorted((root / "ant").iterdir()) + sorted((root / "zebra").iterdir())
    x = torch.stack([load_image(f, 16) for f in files])
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * 0.18215
        ref_flip = vae.encode(x.flip(-1)).latent_dist.mean * 0.18215
    lcfg = DataConfig(name="latents", path=str(out), image_size=16, vae=tiny_vae_dir)
    assert describe(lcfg) == {"in_channels": 4, "input_size": 2, "num_classes": 2, "pixel_space": False}
    ds = build_dataset(lcfg)
    assert isinstance(ds, LatentDataset) and len(ds) == 6 and ds.input_size == 2 and ds.channels == 4
    assert ds.class_names == ("ant", "zebra")
    got = torch.stack([ds[i][0] for i in range(6)])
    got_flip = torch.stack([ds.get(i, flip=True)[0] for i in range(6)])
    assert got.dtype == torch.float32 and [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_flip, ref_flip, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(got, got_flip, atol=1e-3)

    # pickling for DataLoader workers does not copy the memmap
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays is None and torch.equal(clone[3][0], got[3])

    images = decode_latents(vae, got)
    assert images.shape == (6, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(images, vae.decode(got / 0.18215).sample.clamp(-1, 1))

    # encoding again with the same settings is a no-op; other settings are refused
    mtime = os.stat(out / "latents.npy").st_mtime_ns
    assert encode_latents(cfg) == out and os.stat(out / "latents.npy").st_mtime_ns == mtime
    with pytest.raises(ValueError, match="holds latents of other settings"):
        encode_latents(replace(cfg, image_size=24))
    with pytest.raises(ValueError, match="data.image_size=32 but the latents .* image_size 16"):
        describe(DataConfig(name="latents", path=str(out), image_size=32))


def test_latent_errors(tmp_path, tiny_vae_dir):
    root = _write_folder(tmp_path / "images", classes=("a",), per_class=1)
    cfg = EncodeConfig(path=str(root), out=str(tmp_path / "z"), image_size=20, vae=tiny_vae_dir, num_workers=0,
                       device="cpu")
    with pytest.raises(ValueError, match="data.image_size=20 must be divisible by 8"):
        encode_latents(cfg)
    with pytest.raises(ValueError, match="data.image_size=20 must be divisible by 8"):
        describe(DataConfig(name="latents", path=str(root), image_size=20))
    with pytest.raises(ValueError, match="holds no encoded latents"):
        build_dataset(DataConfig(name="latents", path=str(root), image_size=16))
    bad = str(tmp_path / "no_vae_here")
    with pytest.raises(ValueError, match="data.vae=.*no_vae_here.* cannot be loaded.*local directory"):
        encode_latents(replace(cfg, image_size=16, vae=bad))
    assert not (tmp_path / "z").exists()


def test_cli_encode(tmp_path, tiny_vae_dir, capsys):
    root = _write_folder(tmp_path / "images", classes=("a", "b"), per_class=2, size=(16, 16))
    encode_main(["--path", str(root), "--out", str(tmp_path / "z"), "--image-size", "16", "--vae", tiny_vae_dir,
          "--num-workers", "0", "--device", "cpu", "--max-images", "2"])
    assert '"count": 2' in capsys.readouterr().out
    assert np.load(tmp_path / "z" / "labels.npy").tolist() == [0, 1]  # strided subset keeps both classes


# ----------------------------------------------------------------------------- flips


def test_random_flip_is_seeded_and_fair():
    x = torch.randn(2000, 1, 4, 4)
    a = random_flip(x, torch.Generator().manual_seed(7))
    b = random_flip(x, torch.Generator().manual_seed(7))
    c = random_flip(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    same = (a == x).flatten(1).all(1)
    assert (flipped ^ same).all()  # every image is either untouched or mirrored
    assert 0.45 < flipped.float().mean() < 0.55
