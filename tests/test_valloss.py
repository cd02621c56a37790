"""The held-out split and the deterministic held-out loss (scaling/valloss.py)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import randomize_
from scaling import data as data_module
from scaling import valloss
from scaling.checkpoint import checkpoint_path, load_checkpoint
from scaling.config import build_model_for, config_from_overrides, make_plan, run_dir_for, run_id
from scaling.diffusion import Diffusion, DiffusionConfig
from scaling.models import build_model
from scaling.results import collect
from scaling.rundir import read_jsonl
from scaling.train import batch_indices, train
from scaling.valloss import (HeldOut, TrainSplit, ValConfig, bucket_name, check_config, log_spaced,
                             split_indices, timestep_grid, with_val_rows)


def tiny(output_root, *extra):
    return ["model=laptop_s", "patch=8", "data.image_size=16", "data.max_images=256", "train.batch_img=8",
            "train.log_every=1", "train.ckpt_every=3", "train.steps=3", "eval.inline=false", "wandb=disabled",
            "val.heldout_img=32", "val.batch_img=32", f"output_root={output_root}", *extra]


def test_split_is_disjoint_seeded_and_bounded():
    train_idx, held = split_indices(1000, ValConfig(heldout_img=256))
    assert len(held) == 256 and len(train_idx) == 744
    assert np.intersect1d(train_idx, held).size == 0 and np.union1d(train_idx, held).tolist() == list(range(1000))
    assert (split_indices(1000, ValConfig(heldout_img=256))[1] == held).all()
    assert not (split_indices(1000, ValConfig(heldout_img=256, split_seed=1))[1] == held).all()
    with pytest.raises(ValueError, match="more than half"):
        split_indices(100, ValConfig(heldout_img=51))


def test_training_batches_never_draw_a_held_out_image():
    class Numbered(torch.utils.data.Dataset):
        def __len__(self):
            return 300

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), i % 10

    full = Numbered()
    train_idx, held = split_indices(len(full), ValConfig(heldout_img=64))
    split = TrainSplit(full, train_idx)
    seen = set()
    for step in range(200):  # 200 x 16 images: 13 epochs of the training split
        for i in batch_indices(step, 16, len(split), seed=0):
            x, y = split.get(i, flip=bool(step % 2))
            seen.add(int(x[0, 0, 0]))
            assert y == int(x[0, 0, 0]) % 10
    assert seen == set(train_idx.tolist()) and not seen & set(held.tolist())


def test_grid_and_buckets():
    grid = timestep_grid(1000, 8)
    assert grid.tolist() == [20, 157, 294, 431, 569, 706, 843, 980]
    assert [bucket_name(t, 1000) for t in grid] == ["t000_249"] * 2 + ["t250_499"] * 2 + ["t500_749"] * 2 + \
        ["t750_999"] * 2
    with pytest.raises(ValueError, match="multiple of train.log_every=50"):
        check_config(ValConfig(every=75), 50)


def test_log_spaced_rows_thin_out_by_decade():
    rows = range(25, 43_001, 25)  # laptop-XXS/4 at 2e12 FLOPs, logged every 25 steps
    due = [s for s in rows if log_spaced(s, 25, 20)]
    assert due[:8] == [25, 50, 75, 100, 125, 150, 175, 200]  # rows sparser than 20 a decade: every one
    assert len(due) == 54 and due[-1] == 39_825  # not 1,720
    for lo in (100, 1000, 10_000):  # at most 20 rows in any decade
        assert sum(lo <= s < 10 * lo for s in due) <= 20
    ratios = np.array(due[30:]) / np.array(due[29:-1])
    assert ratios.max() < 10 ** (2 / 20)  # no gap wider than two bins
    held = _heldout(per_decade=20)
    held.log_every, held.steps = 25, 43_013
    assert [s for s in rows if held.due(s)] == due and held.due(43_013)  # and the run's last step
    held.ckpt_every = 5000  # and every checkpoint, whose FD then has its loss
    assert [s for s in rows if held.due(s)] == sorted(set(due) | set(range(5000, 43_001, 5000)))
    with pytest.raises(ValueError, match="val.every=50 and val.per_decade=20: set one of them"):
        check_config(ValConfig(every=50, per_decade=20), 50)
    with pytest.raises(ValueError, match="val.per_decade=-1 must be >= 0"):
        check_config(ValConfig(per_decade=-1), 50)
    with pytest.raises(ValueError, match="train.ckpt_every=130 must be a multiple of train.log_every=25"):
        check_config(ValConfig(per_decade=20), 25, 130)



def _heldout(pixel_space=True, channels=1, **cfg):
    torch.manual_seed(0)
    x = torch.rand(20, channels, 8, 8) * 2 - 1
    dataset = list(zip(x, [i % 10 for i in range(20)]))
    return HeldOut(dataset, np.arange(20), ValConfig(**{"batch_img": 7, **cfg}), Diffusion(DiffusionConfig()),
                   pixel_space, "cpu", steps=10)


def _model(channels=1):
    return randomize_(build_model("laptop_s", 4, input_size=8, in_channels=channels, num_classes=10), std=0.02)


def test_loss_is_deterministic_and_leaves_the_training_stream_alone():
    held, model = _heldout(), _model()
    model.train()
    rng = torch.get_rng_state()
    a = held.losses(model)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # no draw from the global stream
    b = _heldout().losses(model)  # built again: same images, grid and noise
    assert a == b  # to the bit
    assert set(a) == {"val_mse_ema", "val_vlb_bpd_ema", *(f"val_{k}_ema_{q}" for k in ("mse", "kl_bpd") for q in
                                                         ("t000_249", "t250_499", "t500_749", "t750_999"))}
    assert all(np.isfinite(v) and v > 0 for v in a.values())
    assert a["val_mse_ema"] == pytest.approx(np.mean([a[f"val_mse_ema_{q}"] for q in
                                                      ("t000_249", "t250_499", "t500_749", "t750_999")]))
    other = _heldout(noise_seed=1).losses(model)
    assert other["val_mse_ema"] != a["val_mse_ema"]  # the noise is part of the definition


def test_loss_does_not_depend_on_the_images_per_forward(monkeypatch):
    # On a CPU the held-out images go through the model ~2,048 tokens at a time (scaling.models.images_per_forward),
    # in near-equal parts; otherwise in slices of val.batch_img, as before. The loss is one forward's up to rounding.
    model, sizes = _model(), []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    whole = _heldout(batch_img=20).losses(model)
    assert sizes == [20] * 9  # 8 timesteps and the decoder term
    sizes.clear()
    _heldout(batch_img=8).losses(model)
    assert sizes == [8, 8, 4] * 9  # val.batch_img's slices when the token budget does not bind
    monkeypatch.setattr("scaling.models.CPU_FORWARD_TOKENS", 4 * 8)  # 8 images of 4 tokens (8x8 at patch 4)
    sizes.clear()
    chunked = _heldout(batch_img=20).losses(model)
    assert sizes == [7, 7, 6] * 9
    assert chunked.keys() == whole.keys()
    assert all(chunked[k] == pytest.approx(whole[k], rel=1e-5) for k in whole), (chunked, whole)


def test_latents_report_nats_per_dim_and_raw_weights_on_request():
    held = _heldout(pixel_space=False, channels=4, raw=True)
    ema, raw = _model(4), _model(4)
    row = held.log_row(10, ema, raw)
    assert "val_vlb_npd_ema" in row and "val_vlb_npd_raw" in row and "val_vlb_bpd_ema" not in row
    assert row["val_mse_raw"] == held.losses(raw, "raw")["val_mse_raw"]
    late = _heldout(pixel_space=False, channels=4, every=5)
    assert late.log_row(3, ema) == {} and late.log_row(10, ema)  # due at multiples of every and at the last step


def test_with_val_rows_joins_the_results_table():
    base = {"run_id": "r", "model": "laptop_s"}
    metrics = [{"step": s, "img_seen": 8 * s, "loss": 1.0, "val_mse_ema": 1.0 / s} for s in (1, 2, 3)]
    rows = with_val_rows([{**base, "step": 3, "fd": 9.0}], base, metrics)
    assert [(r["step"], r.get("fd"), r["val_mse_ema"]) for r in rows] == [(3, 9.0, 1 / 3), (1, None, 1.0),
                                                                          (2, None, 0.5)]
    assert with_val_rows([dict(base)], base, metrics)[0]["step"] == 1  # the placeholder row makes way
    assert with_val_rows([dict(base)], base, [{"step": 1, "loss": 1.0}]) == [base]  # no held-out loss: unchanged


def test_split_changes_the_run_id_and_the_schedule_does_not(tmp_path):
    ids = {o: run_id(config_from_overrides(tiny(tmp_path, o))) for o in
           ("val.heldout_img=32", "val.heldout_img=16", "val.split_seed=1", "val.every=2", "val.timesteps=4",
            "val.per_decade=10")}
    assert len({ids["val.heldout_img=32"], ids["val.heldout_img=16"], ids["val.split_seed=1"]}) == 3
    assert ids["val.every=2"] == ids["val.timesteps=4"] == ids["val.per_decade=10"] == ids["val.heldout_img=32"]


def test_training_logs_the_held_out_loss_and_never_reads_held_out_images(tmp_path, monkeypatch):
    reads = []
    real = data_module.build_dataset

    def recording(cfg):
        ds = real(cfg)

        class Recorded(torch.utils.data.Dataset):
            def __len__(self):
                return len(ds)

            def __getitem__(self, i):
                reads.append(int(i))
                return ds[i]
        return Recorded()

    monkeypatch.setattr(valloss, "build_dataset", recording)  # the module that builds the split
    cfg = config_from_overrides(tiny(tmp_path))
    assert train(cfg)["state"] == "done"
    _, held = split_indices(10_000, cfg.val)  # drawn from all of animal-mnist, before max_images=256 applies
    assert reads[:32] == held.tolist()  # the held-out set is read once, up front ...
    assert len(reads) == 32 + 3 * 8 and not set(reads[32:]) & set(held.tolist())  # ... and training never reads it
    train_part = set(np.setdiff1d(np.arange(10_000), held)[data_module.strided_subset(10_000 - 32, 256)].tolist())
    assert set(reads[32:]) <= train_part  # the strided subset of the rest
    run = run_dir_for(cfg)
    rows = read_jsonl(run.metrics)
    assert [r["step"] for r in rows] == [1, 2, 3] and all("val_vlb_bpd_ema" in r for r in rows)
    # the same checkpoint gives the same number to the bit
    ckpt = load_checkpoint(checkpoint_path(run, 3))
    plan = make_plan(cfg)
    ema = build_model_for(cfg, plan)
    ema.load_state_dict(ckpt["ema"])
    x = real(replace(cfg.data, max_images=None))
    again = HeldOut(x, held, cfg.val, Diffusion(cfg.diffusion), True, "cpu", 3).losses(ema)
    assert again == {k: v for k, v in rows[-1].items() if k.startswith("val_")}
    assert plan["heldout_img"] == 32
    table = collect([tmp_path])  # into the results table: one row per logged step, no evals here
    assert table["step"].tolist() == [1, 2, 3] and table["fd"].isna().all()
    assert table["val_mse_ema"].tolist() == [r["val_mse_ema"] for r in rows]
