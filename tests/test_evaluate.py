"""Evaluation: config validation, the ADM .npz from sampling (resumable, sharded), evaluate_checkpoint rows that are
never duplicated, missing_evals, and scoring an external .npz."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import scaling.evaluate as ev
from scaling.checkpoint import save_checkpoint
from scaling.config import EvalConfig, RunConfig, config_to_dict
from scaling.data import DataConfig, load_animal_mnist
from scaling.diffusion import DiffusionConfig
from scaling.evaluate import (balanced_labels, evaluate_checkpoint, final_setting, missing_evals, sample_to_npz,
                              stream_samples,
                              setting_key, validate_eval)
from scaling.features import to_uint8
from scaling.models import build_model
from scaling.rundir import RunDir, atomic_write_text, read_jsonl, write_json

SIZE = 16
PLAN = {"input_size": SIZE, "in_channels": 1, "num_classes": 10, "pixel_space": True, "batch_img": 8,
        "dataset": "animal_mnist", "resolution": SIZE}
FAST = dict(sampler="ddim", sampling_steps=2)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("laptop_s", 8, input_size=SIZE, in_channels=1, num_classes=10)
    with torch.no_grad():  # adaLN-Zero starts at a zero output: perturb it so samples depend on the weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.sizes = model, model.num_classes, []
        self.grid_size, self.block = model.grid_size, model.block  # what images_per_forward reads

    @property
    def calls(self) -> int:
        return len(self.sizes)

    def forward(self, x, t, y):
        self.sizes.append(x.shape[0])
        return self.model(x, t, y)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("change, match", [
    (dict(backend="clip"), r"eval.backend='clip'; allowed: inception, inception_offline, domain"),
    (dict(num_samples=0), r"eval.num_samples=0; allowed: an integer >= 1"),
    (dict(num_samples=-5), r"eval.num_samples=-5"),
    (dict(cfg_scale=0.5), r"eval.cfg_scale=0.5; allowed: >= 1.0"),
    (dict(sampler="euler"), r"eval.sampler='euler'; allowed: ddpm, ddim"),
    (dict(sampling_steps=0), r"eval.sampling_steps=0"),
    (dict(every_ckpt=0), r"eval.every_ckpt=0"),
    (dict(num_samples=3), r"precision/recall with k=3"),
    (dict(final_num_samples=500), r"eval.final_num_samples=500; allowed: 0 \(off\) or >= eval.num_samples=1000"),
    (dict(final_num_samples=-1), r"eval.final_num_samples=-1"),
    (dict(num_samples=250, final_num_samples=500, batch_size=256), r"eval.batch_size=256 does not divide"),
])
def test_bad_eval_config_fails_with_one_line(change, match):
    with pytest.raises(ValueError, match=match) as e:
        validate_eval(replace(EvalConfig(), **change))
    assert "\n" not in str(e.value)


def test_setting_key_is_short_stable_and_complete():
    assert setting_key(EvalConfig()) == "domain-n1000-ddpm250-cfg1.0-s0"
    keys = {setting_key(replace(EvalConfig(), **c)) for c in (
        {}, {"backend": "inception"}, {"num_samples": 50_000}, {"sampler": "ddim"}, {"sampling_steps": 100},
        {"cfg_scale": 1.5}, {"seed": 1}, {"guide_channels": 3}, {"num_ref": 500})}
    assert len(keys) == 9


def test_a_curve_setting_of_a_longer_stream_is_named_as_such():
    curve = EvalConfig(num_samples=250, final_num_samples=500, batch_size=250)
    assert setting_key(curve) == "domain-n250-ddpm250-cfg1.0-s0-of500"
    assert setting_key(final_setting(curve)) == "domain-n500-ddpm250-cfg1.0-s0"
    assert stream_samples(curve) == 500 and final_setting(EvalConfig()) is None
    assert setting_key(replace(curve, final_num_samples=250)) == "domain-n250-ddpm250-cfg1.0-s0"  # no longer draw


def test_labels_are_balanced_and_seeded():
    y = balanced_labels(1000, 10, seed=0)
    assert torch.equal(y.bincount(), torch.full((10,), 100))
    assert torch.equal(y, balanced_labels(1000, 10, seed=0)) and not torch.equal(y, balanced_labels(1000, 10, 1))


# ----------------------------------------------------------------------------- sampling to disk


def test_samples_npz_has_the_adm_layout(tmp_path):
    out = sample_to_npz(tiny_model(), DiffusionConfig(), PLAN, 10, **FAST, seed=0, batch_size=4,
                        out_path=tmp_path / "s.npz", device="cpu", progress=False)
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, SIZE, SIZE, 3)
    assert np.array_equal(images[..., 0], images[..., 2])  # grey repeated to three channels
    assert images.std() > 0  # not a constant image
    assert np.array_equal(labels, balanced_labels(10, 10, 0).numpy())
    assert not (tmp_path / "s.npz.parts").exists()  # shards are removed after assembly


def test_a_draw_of_the_first_samples_of_a_stream_is_a_prefix_of_the_whole_draw(tmp_path):
    torch.set_num_threads(1)
    model = tiny_model()
    whole = sample_to_npz(model, DiffusionConfig(), PLAN, 12, **FAST, seed=3, batch_size=4,
                          out_path=tmp_path / "whole.npz", device="cpu", progress=False)
    first = sample_to_npz(model, DiffusionConfig(), PLAN, 8, **FAST, seed=3, batch_size=4, stream=12,
                          out_path=tmp_path / "first.npz", device="cpu", progress=False)
    plain = sample_to_npz(model, DiffusionConfig(), PLAN, 8, **FAST, seed=3, batch_size=4,
                          out_path=tmp_path / "plain.npz", device="cpu", progress=False)
    with np.load(whole) as w, np.load(first) as f, np.load(plain) as p:
        assert np.array_equal(f["arr_0"], w["arr_0"][:8]) and np.array_equal(f["arr_1"], w["arr_1"][:8])
        assert not np.array_equal(p["arr_1"], w["arr_1"][:8])  # a plain 8-sample draw balances its own labels
    with pytest.raises(ValueError, match="stream=4 is shorter than num_samples=8"):
        sample_to_npz(model, DiffusionConfig(), PLAN, 8, **FAST, stream=4, out_path=tmp_path / "x.npz",
                      device="cpu", progress=False)


def test_concat_npz_streams_shards_into_one_npz(tmp_path):
    g = np.random.default_rng(0)
    parts = [{"arr_0": g.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), "arr_1": np.arange(n, dtype=np.int64) + n}
             for n in (3, 1, 5)]
    for k, part in enumerate(parts):
        np.savez(tmp_path / f"{k}.npz", **part)
    ev.concat_npz(tmp_path / "all.npz", [tmp_path / f"{k}.npz" for k in range(3)], ("arr_0", "arr_1"))
    with np.load(tmp_path / "all.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        for key in ("arr_0", "arr_1"):
            want = np.concatenate([p[key] for p in parts])
            assert f[key].dtype == want.dtype and np.array_equal(f[key], want)


def test_npz_array_maps_stored_members_and_reads_compressed_ones(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", mu=np.zeros(3), arr_0=a, arr_1=np.arange(5))
    np.savez_compressed(tmp_path / "c.npz", arr_0=a)
    ev.concat_npz(tmp_path / "cat.npz", [tmp_path / "s.npz"], ("arr_0", "arr_1"))
    for name, mapped in (("s.npz", True), ("c.npz", False), ("cat.npz", True)):
        got = ev.npz_array(tmp_path / name)
        assert isinstance(got, np.memmap) == mapped and np.array_equal(got, a)
    assert np.array_equal(ev.npz_array(tmp_path / "cat.npz", "arr_1"), np.arange(5))


def test_sampling_resumes_from_shards_and_gives_the_same_array(tmp_path):
    kw = dict(**FAST, seed=3, batch_size=4, device="cpu", progress=False)
    whole = CountingModel(tiny_model())
    sample_to_npz(whole, DiffusionConfig(), PLAN, 10, out_path=tmp_path / "a.npz", **kw)
    assert whole.calls == 3 * 2  # three batches x two steps

    # "Killed" after batches 0 and 2: their shards are on disk. A second job draws only batch 1.
    parts = tmp_path / "b.npz.parts"
    parts.mkdir()
    with np.load(tmp_path / "a.npz") as f:
        a_images, a_labels = f["arr_0"], f["arr_1"]
    for b in (0, 2):
        one = CountingModel(tiny_model())
        sample_to_npz(one, DiffusionConfig(), PLAN, 10, out_path=tmp_path / f"only{b}.npz", **kw)
        np.savez(parts / f"batch_{b:06d}.npz", arr_0=a_images[4 * b:4 * b + 4], arr_1=a_labels[4 * b:4 * b + 4])
    (parts / "spec.json").write_text(json.dumps({"num_samples": 10, "batch_size": 4, "seed": 3, "sampler": "ddim",
                                                 "sampling_steps": 2, "cfg_scale": 1.0, "guide_channels": None},
                                                sort_keys=True))
    resumed = CountingModel(tiny_model())
    sample_to_npz(resumed, DiffusionConfig(), PLAN, 10, out_path=tmp_path / "b.npz", **kw)
    assert resumed.calls == 1 * 2
    with np.load(tmp_path / "b.npz") as f:
        assert np.array_equal(f["arr_0"], a_images) and np.array_equal(f["arr_1"], a_labels)


@pytest.mark.parametrize("patch, cfg_scale, sizes", [
    (8, 1.0, [12]),       # 4 tokens an image: the batch of 12 in one forward
    (8, 1.5, [24]),       # guided: [x; x] of the whole batch in one forward, not split in two
    (2, 1.0, [6, 6]),     # 64 tokens: 8 images at most (the minimum; 6 by tokens), in two near-equal parts
    (2, 1.5, [8, 8, 8]),  # guided: 8 model images a forward, 4 of the batch doubled
])
def test_sampling_forwards_take_the_cpu_token_budget(tmp_path, monkeypatch, patch, cfg_scale, sizes):
    monkeypatch.setattr("scaling.models.CPU_FORWARD_TOKENS", 64 * 6)
    torch.manual_seed(0)
    model = CountingModel(build_model("laptop_s", patch, input_size=SIZE, in_channels=1, num_classes=10).eval())
    sample_to_npz(model, DiffusionConfig(), PLAN, 12, sampler="ddim", sampling_steps=2, cfg_scale=cfg_scale,
                  batch_size=12, device="cpu", progress=False, out_path=tmp_path / "s.npz")
    assert model.sizes == sizes * 2  # two steps


def test_sharding_over_ranks_gives_the_same_array(tmp_path, monkeypatch):
    kw = dict(**FAST, seed=5, batch_size=3, device="cpu", progress=False)
    sample_to_npz(tiny_model(), DiffusionConfig(), PLAN, 10, out_path=tmp_path / "one.npz", **kw)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    for rank in (1, 0):  # rank 1 draws batches 1, 3; rank 0 draws 0, 2 and assembles
        monkeypatch.setattr(ev, "_dist", lambda r=rank: (r, 2))
        model = CountingModel(tiny_model())
        sample_to_npz(model, DiffusionConfig(), PLAN, 10, out_path=tmp_path / "two.npz", **kw)
        assert model.calls == 2 * 2
        assert (tmp_path / "two.npz").exists() == (rank == 0)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


# ----------------------------------------------------------------------------- evaluate_checkpoint


def make_run(root, steps=(2, 4, 6), eval_cfg=None) -> RunDir:
    """A run directory with checkpoints of a tiny model, written through the project's own save_checkpoint."""
    cfg = RunConfig(patch=8, data=DataConfig(image_size=SIZE), output_root=str(root))
    cfg.eval = eval_cfg or EvalConfig(num_samples=20, **FAST, batch_size=10, num_ref=200)
    run = RunDir(root / "runs" / "tiny").create()
    atomic_write_text(run.config, OmegaConf.to_yaml(config_to_dict(cfg)))
    write_json(run.plan, PLAN)
    for step in steps:
        sd = tiny_model(seed=step).state_dict()
        save_checkpoint(run, {"model": sd, "ema": sd, "opt": {}, "step": step, "img_seen": step * 8, "rng": {},
                              "data": {}, "config": config_to_dict(cfg)})
    return run


def test_evaluate_checkpoint_writes_one_row_per_setting(tmp_path):
    run = make_run(tmp_path)
    eval_cfg = EvalConfig(num_samples=20, **FAST, batch_size=10, num_ref=200)
    assert missing_evals(run.path, eval_cfg, 2, 6) == [2, 4, 6]
    row = evaluate_checkpoint(run.path, 4, eval_cfg, device="cpu", progress=False)
    assert row["step"] == 4 and row["img_seen"] == 32 and row["setting"] == setting_key(eval_cfg)
    assert set(row["metrics"]) == {"fd20_domain", "is20_domain", "precision20_domain", "recall20_domain"}
    assert row["fd"] == row["metrics"]["fd20_domain"] > 0 and row["metric_name"] == "fd20_domain"
    assert "fid" not in row  # FID only with torch-fidelity's Inception weights
    assert row["feature_extractor"] == "domain" and row["feature_extractor_info"]["held_out_accuracy"] > 0.85
    assert 1 <= row["inception_score"] <= 10 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert (row["num_samples"], row["num_ref"], row["sampler"], row["sampling_steps"], row["cfg_scale"],
            row["seed"]) == (20, 200, "ddim", 2, 1.0, 0)
    assert row["wall_s"] > 0 and row["dataset"] == "animal_mnist" and row["resolution"] == SIZE
    with np.load(row["npz"]) as f:
        assert f["arr_0"].shape == (20, SIZE, SIZE, 3) and f["arr_0"].dtype == np.uint8
    assert len(list(run.samples.glob("eval_step0000004_*.png"))) == 1

    assert missing_evals(run.path, eval_cfg, 2, 6) == [2, 6]
    again = evaluate_checkpoint(run.path, 4, eval_cfg, device="cpu", progress=False)
    assert again == json.loads(json.dumps(row)) and len(read_jsonl(run.evals)) == 1  # no duplicate row

    other = replace(eval_cfg, seed=1)  # another setting: its own row
    assert missing_evals(run.path, other, 2, 6) == [2, 4, 6]
    assert evaluate_checkpoint(run.path, 4, other, device="cpu", progress=False)["setting"] != row["setting"]
    assert len(read_jsonl(run.evals)) == 2


def test_evaluate_checkpoint_uses_the_runs_eval_config(tmp_path):
    run = make_run(tmp_path, steps=(2,), eval_cfg=EvalConfig(num_samples=20, **FAST, batch_size=10, num_ref=200,
                                                             precision_recall=False, export_npz=False))
    row = evaluate_checkpoint(run.path, 2, device="cpu", progress=False)
    assert row["setting"] == "domain-n20-ddim2-cfg1.0-s0-ref200" and row["precision"] is None
    assert row["npz"] is None and not list(run.samples.glob("*.npz"))


def test_the_final_checkpoint_is_scored_at_both_sizes_from_one_draw(tmp_path):
    torch.set_num_threads(1)
    curve = EvalConfig(num_samples=10, final_num_samples=20, **FAST, batch_size=10, num_ref=200, kid=True)
    run = make_run(tmp_path, steps=(2, 4), eval_cfg=curve)
    assert missing_evals(run.path, curve, 2, 4) == [2, 4]
    mid = evaluate_checkpoint(run.path, 2, curve, device="cpu", progress=False, final_step=4)
    assert mid["setting"] == "domain-n10-ddim2-cfg1.0-s0-ref200-of20" and mid["metric_name"] == "fd10_domain"
    assert len(read_jsonl(run.evals)) == 1  # an intermediate checkpoint: the curve's row only
    assert {"kid10_domain", "kid_std10_domain"} <= set(mid["metrics"]) and mid["kid"] is not None
    with np.load(mid["npz"]) as f:
        assert f["arr_0"].shape[0] == 10

    row = evaluate_checkpoint(run.path, 4, curve, device="cpu", progress=False, final_step=4)
    rows = {r["setting"]: r for r in read_jsonl(run.evals) if r["step"] == 4}
    big = rows[setting_key(final_setting(curve))]
    assert row == rows[setting_key(curve)] and row["metric_name"] == "fd10_domain"
    assert big["metric_name"] == "fd20_domain" and {"fd20_domain", "kid20_domain"} <= set(big["metrics"])
    assert row["npz"] == big["npz"]  # one draw of 20; the curve's row scores its first 10
    images = np.load(big["npz"])["arr_0"]
    assert images.shape[0] == 20
    direct = ev.compute_metrics(ev.UInt8Images(images[:10]), *_reference(run), prc=False, kid=False,
                                progress=False)
    assert direct["fd"] == pytest.approx(row["fd"], rel=1e-9) and big["fd"] != row["fd"]
    assert missing_evals(run.path, curve, 2, 4) == []

    # the final step's larger draw is due on its own when only the curve's row is there
    kept = [r for r in read_jsonl(run.evals) if r["setting"] == setting_key(curve)]
    run.evals.write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert missing_evals(run.path, curve, 2, 4) == [4]


def _reference(run):
    """(reference images, feature space) as evaluate_checkpoint builds them for the run's data."""
    from scaling.features import build_extractor

    cfg = ev.run_config(run)
    pixel_cfg = ev.pixel_data_config(cfg.data)
    space = build_extractor("domain", pixel_cfg, progress=False)
    ref, _ = ev.reference_set(pixel_cfg, 200)
    return ref, space


def test_missing_evals_every_kth_checkpoint(tmp_path):
    run = make_run(tmp_path, steps=(1, 2, 3, 4, 5))
    assert missing_evals(run.path, EvalConfig(every_ckpt=2), ckpt_every=1, final_step=5) == [2, 4, 5]
    assert missing_evals(run.path, EvalConfig(every_ckpt=1), ckpt_every=1, final_step=5) == [1, 2, 3, 4, 5]


def test_score_an_external_npz(tmp_path, capsys):
    x = load_animal_mnist(SIZE).x[::25]  # 400 real images stand in for another codebase's samples
    np.savez(tmp_path / "other.npz", arr_0=to_uint8(x).permute(0, 2, 3, 1).numpy())
    ev.main(["--npz", str(tmp_path / "other.npz"), "--dataset", "animal_mnist", "--image-size", str(SIZE),
             "--backend", "domain", "--num-ref", "1000"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["metrics"]) == {"fd400_domain", "is400_domain", "precision400_domain", "recall400_domain"}
    assert out["num_samples"] == 400 and out["num_ref"] == 1000 and out["metrics"]["fd400_domain"] < 20


def test_rows_of_another_classifier_are_scored_again_with_rescore(tmp_path, capsys):
    # A run scored before the package shipped its classifier (weights trained on that machine): its rows are in
    # another feature space, which the figures refuse to mix (scaling.results.mixed_feature_spaces). --rescore
    # scores those checkpoints again with this machine's weights; the new row is the one the table keeps.
    run = make_run(tmp_path, steps=(2, 4))
    row = evaluate_checkpoint(run.path, 4, device="cpu", progress=False)
    sha, key = row["feature_weights_sha"], {row["setting"]}
    assert len(sha) == 16 and ev.other_weights_steps(run.path, key, sha) == []
    atomic_write_text(run.evals, json.dumps({**row, "feature_weights_sha": "0" * 16, "fd": -1.0}) + "\n")
    assert ev.other_weights_steps(run.path, key, sha) == [4]
    assert ev.main([str(run.path), "--step", "4"]) == 0      # without --rescore: the row stands
    assert len(read_jsonl(run.evals)) == 1
    capsys.readouterr()
    assert ev.main([str(run.path), "--step", "4", "--rescore"]) == 0
    rows = read_jsonl(run.evals)
    assert [r["feature_weights_sha"] for r in rows] == ["0" * 16, sha]
    assert rows[1]["fd"] == pytest.approx(row["fd"], rel=1e-6)  # the same samples scored again
    assert ev.find_eval(run.path, 4, row["setting"]) == rows[1] and ev.other_weights_steps(run.path, key, sha) == []
    assert ev.main([str(run.path), "--rescore"]) == 0          # nothing left in another space
    assert len(read_jsonl(run.evals)) == 2
    # the kept row is the latest: a current row followed by another classifier's is stale, and scored again
    with open(run.evals, "a") as f:
        f.write(json.dumps({**rows[1], "feature_weights_sha": "1" * 16}) + "\n")
    assert ev.find_eval(run.path, 4, row["setting"], sha) is None and ev.other_weights_steps(run.path, key, sha) == [4]
    assert ev.main([str(run.path), "--step", "4", "--rescore"]) == 0
    assert read_jsonl(run.evals)[-1]["feature_weights_sha"] == sha
    # rows of a setting the run does not evaluate are not the run's to re-score
    assert ev.other_weights_steps(run.path, {"domain-n1000-ddpm250-cfg1.0-s0"}, sha) == []
