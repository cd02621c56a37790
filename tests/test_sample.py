"""python -m scaling.sample: the release's key set loads, a wrong model names its keys, guidance is the release's
forward_with_cfg, release weights -> SD VAE -> ADM .npz -> scores against an ADM reference batch end to end,
a killed run resumes to the same .npz, project checkpoints sample their EMA weights, bad input is one line."""

import json
from unittest import mock

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.utils import create_feature_extractor

import scaling.adm as adm
import scaling.diffusion
import scaling.evaluate
import scaling.evaluate as ev
import scaling.sample as sm
from helpers import randomize_
from scaling.data import load_vae
from scaling.diffusion import Diffusion, DiffusionConfig, guided, sample
from scaling.evaluate import batch_seed
from scaling.features import to_uint8
from scaling.models import build_model
from test_models import release_dit_xl2_shapes

IMAGE = 32                  # pixels; latents 4x4x4, patch 2: 4 tokens
FAST = ["--sampling-steps", "2", "--batch-size", "4", "--device", "cpu"]


def tiny_dit(seed=0):
    """A laptop_s/2 DiT on 4x4x4 latents with the release's 1000 classes (+ the null class), random weights."""
    torch.manual_seed(seed)
    return randomize_(build_model("laptop_s", 2, input_size=IMAGE // 8, in_channels=4, num_classes=1000), seed)


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    """A random DiT saved as the release saves its weights: a bare state dict."""
    path = tmp_path_factory.mktemp("ckpt") / "DiT-tiny-32x32.pt"
    torch.save(tiny_dit().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 (the FID network) with PyTorch's default random init, as a weights file."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save({}, path)
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    torch.save(net.state_dict(), path)
    return str(path)


def inception_features(images: np.ndarray, weights: str) -> torch.Tensor:
    net = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False, verbose=False,
                                   feature_extractor_weights_path=weights)
    with torch.no_grad():
        return net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0].double()


@pytest.fixture(scope="module")
def adm_reference(tmp_path_factory, inception_weights):
    """A tiny batch in the ADM layout: 8 images, and (mu, sigma) of 16 images of which those 8 are a subset."""
    g = np.random.default_rng(0)
    base = g.integers(0, 256, (1, IMAGE, IMAGE, 3))
    images = np.clip(base + g.normal(0, 40, (16, IMAGE, IMAGE, 3)), 0, 255).astype(np.uint8)
    f = inception_features(images, inception_weights).numpy()
    path = tmp_path_factory.mktemp("ref") / "VIRTUAL_tiny32_labeled.npz"
    np.savez(path, arr_0=images[:8], mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    return path


def frechet_low_rank(f: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FD = |mu_1 - mu_2|^2 + tr S_1 + tr S_2 - 2 tr (S_1 S_2)^(1/2), written independently of torch-fidelity: with
    S_1 = A^T A / (n - 1) for the centred features A (n, d), the nonzero eigenvalues of S_1 S_2 are those of the
    n x n matrix A S_2 A^T / (n - 1), so the trace of the square root needs no d x d matrix function."""
    a = f - f.mean(0)
    small = a @ sigma @ a.T / (len(f) - 1)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    return float(((f.mean(0) - mu) ** 2).sum() + (a ** 2).sum() / (len(f) - 1) + np.trace(sigma) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------- checkpoints


def test_release_key_set_loads_and_a_wrong_model_names_the_keys():
    sd = {k: torch.empty(s, device="meta") for k, s in release_dit_xl2_shapes().items()}
    assert sm.describe_weights(sd) == {"name": "dit_xl", "depth": 28, "hidden_size": 1152, "patch": 2,
                                       "input_size": 32, "in_channels": 4, "learn_sigma": True, "num_classes": 1000}
    model = sm.model_for_weights(sd, "dit_xl", 2, 32)
    assert set(model.state_dict()) == set(sd) and model.num_classes == 1000
    assert sm.parse_model("DiT-XL/2") == ("dit_xl", 2) and sm.parse_model("dit_l") == ("dit_l", None)
    with pytest.raises(ValueError) as e:
        sm.model_for_weights(sd, "dit_l", 2, 32, source="checkpoint 'DiT-XL-2-256x256.pt'")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("checkpoint 'DiT-XL-2-256x256.pt' does not fit dit_l/2")
    assert "unexpected keys: blocks.24.attn.qkv.weight" in msg and "(+37 more)" in msg  # 4 blocks x 10 keys
    assert "pos_embed (1, 256, 1152) vs (1, 256, 1024)" in msg
    assert msg.endswith("the weights are dit_xl patch 2 on 32x32 inputs")
    with pytest.raises(ValueError, match=r"does not fit dit_xl/4 .* x_embedder.proj.weight \(1152, 4, 2, 2\) vs "
                                         r"\(1152, 4, 4, 4\)"):
        sm.model_for_weights(sd, "dit_xl", 4, 32)
    with pytest.raises(ValueError, match="unknown_model.*allowed: dit_s, dit_b"):
        sm.parse_model("unknown_model")


def test_reads_bare_state_dicts_and_ema_weights(tmp_path):
    a, b = tiny_dit(0).state_dict(), tiny_dit(1).state_dict()
    torch.save(a, tmp_path / "bare.pt")
    torch.save({"model": a, "ema": b, "opt": {}, "args": {}}, tmp_path / "train.pt")  # DiT train.py's layout
    for name, want in (("bare.pt", a), ("train.pt", b)):
        sd, run_cfg = sm.read_checkpoint(tmp_path / name)
        assert run_cfg is None and all(torch.equal(sd[k], want[k]) for k in want)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list; allowed: a state dict"):
        sm.read_checkpoint(tmp_path / "list.pt")


# ----------------------------------------------------------------------------- protocols and guidance


def test_protocols_state_the_papers_settings():
    p = sm.PROTOCOLS["paper_table2"]
    assert (p.sampler, p.sampling_steps, p.cfg_scale, p.guide_channels, p.labels, p.precision, p.vae_precision,
            p.num_samples) == ("ddpm", 250, 1.5, 3, "uniform", "tf32", "fp32", 50_000)
    p = sm.PROTOCOLS["paper_fid50k"]
    assert (p.sampler, p.sampling_steps, p.cfg_scale, p.labels) == ("ddpm", 250, 1.0, "uniform")
    assert sm.PROTOCOLS["study_cfg1.5"].guide_channels is None and sm.PROTOCOLS["study"].labels == "balanced"
    assert sm.with_overrides(p, cfg_scale=None, sampling_steps=250) is p  # no change, no new name
    assert sm.with_overrides(p, cfg_scale=4.0).name == "paper_fid50k+cfg_scale=4.0"


def test_sampling_cost_of_table2_on_an_h100():
    # DiT-XL/2: 118.64 Gflops (Table 4); 50K images x 250 steps x 2 (guided) x 2 FLOPs per multiply-add = 5.93e18
    cost = sm.sampling_cost(118.64, 50_000, sm.PROTOCOLS["paper_table2"], 256)
    assert cost["model_flops"] == pytest.approx(118.64e9 * 2 * 50_000 * 250 * 2)
    assert cost["vae_flops"] == pytest.approx(310.6e9 * 2 * 50_000)  # 0.5% of the total
    assert cost["h100_gpu_hours"] == pytest.approx((5.932e18 + 3.106e16) / (494.7e12 * 0.4) / 3600, rel=1e-3)
    unguided = sm.sampling_cost(118.64, 50_000, sm.PROTOCOLS["paper_fid50k"], 256)
    assert unguided["model_flops"] == pytest.approx(cost["model_flops"] / 2)
    assert sm.sampling_cost(1.0, 10, sm.PROTOCOLS["study"], 16, latent=False)["vae_flops"] == 0


def test_dry_run_checks_the_weights_and_prints_the_plan(release_file, capsys):
    assert sm.main([str(release_file), "--dry-run", "--device", "cpu"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["model"] == "laptop_s-2-32" and plan["protocol"] == "paper_table2" and plan["num_samples"] == 50_000
    assert plan["gflops_per_img"] > 0 and plan["h100_gpu_hours"] > 0


def release_forward_with_cfg(model, x, t, y, cfg_scale):
    """The release's DiT.forward_with_cfg (facebookresearch/DiT models.py), transcribed: x, t, y hold the
    conditional half then the unconditional half; 3 epsilon channels are guided; both halves get the result."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def test_guided_sampler_is_the_release_guidance_formula():
    model = tiny_dit().eval()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 4, 4, generator=g), torch.tensor([999, 500, 3]), torch.tensor([1, 207, 999])
    with torch.no_grad():
        ours = guided(model, 1.5, guide_channels=3)(x, t, y)
        theirs = release_forward_with_cfg(model, torch.cat([x, x]), torch.cat([t, t]),
                                          torch.cat([y, torch.full_like(y, 1000)]), 1.5)
    torch.testing.assert_close(ours, theirs[:3], rtol=1e-5, atol=1e-6)  # the conditional half, as sample_ddp keeps
    assert not torch.allclose(ours, guided(model, 1.5)(x, t, y))  # guiding all 4 channels differs


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # ~35 s on one thread: Inception-v3 at 299 px on the CPU, eigenvalues of a 2048 x 2048 product
def test_release_weights_to_scored_adm_npz(tmp_path, release_file, tiny_vae_dir, adm_reference, inception_weights,
                                           capsys):
    out = tmp_path / "out"
    code = sm.main([str(release_file), "--model", "laptop_s", "--patch", "2", "--image-size", str(IMAGE),
                    "--protocol", "paper_table2", "--num-samples", "8", "--vae", tiny_vae_dir, "--out", str(out),
                    "--ref", str(adm_reference), "--inception-weights", inception_weights, *FAST])
    assert code == 0
    tag = "laptop_s-2-32-DiT-tiny-32x32-paper_table2+sampling_steps=2-n8-s0-b4"
    record = json.loads((out / f"{tag}.json").read_text())
    assert json.loads(capsys.readouterr().out)["metrics"] == record["metrics"]
    with np.load(out / f"{tag}.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (8, IMAGE, IMAGE, 3) and images.dtype == np.uint8 and images.std() > 0
    assert (out / f"{tag}.png").is_file() and not (out / f"{tag}.npz.parts").exists()

    # Labels uniform from the seed; chunk 0 is the release's loop: noise, guided DDPM, decode(z / 0.18215), clamp.
    assert np.array_equal(labels, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0)).numpy())
    vae, y = load_vae(tiny_vae_dir), torch.from_numpy(labels[:4])
    z = sample(tiny_dit().eval(), Diffusion(DiffusionConfig()), y, (4, 4, 4, 4), num_steps=2, cfg_scale=1.5,
               guide_channels=3, generator=torch.Generator().manual_seed(batch_seed(0, 0)))
    with torch.no_grad():
        x = vae.decode(z / 0.18215).sample
    expected = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(images[:4], expected)

    # Scores: named for the ADM reference, and the numbers of an independent computation.
    m = record["metrics"]
    assert set(m) == {"fid8_inception_adm", "is8_inception", "precision8_inception_adm", "recall8_inception_adm"}
    with np.load(adm_reference) as ref:
        fd = frechet_low_rank(inception_features(images, inception_weights).numpy(), ref["mu"], ref["sigma"])
    assert m["fid8_inception_adm"] == pytest.approx(fd, rel=1e-4) and fd > 0
    assert 0 <= m["precision8_inception_adm"] <= 1 and 0 <= m["recall8_inception_adm"] <= 1
    assert m["is8_inception"] == pytest.approx(1.0)  # 8 splits of one image each: KL(p(y|x) || p(y)) = 0
    assert record["reference"]["file"] == "VIRTUAL_tiny32_labeled.npz" and record["reference"]["num_images"] == 8
    assert record["protocol"]["name"] == "paper_table2+sampling_steps=2" and record["protocol_base"] == "paper_table2"
    assert record["checkpoint"]["kind"] == "release" and record["vae"] == tiny_vae_dir
    assert record["img_per_s"] > 0 and record["resumed_from_img"] == 0

    # The reference check: the batch's own 8 images against the statistics of the 16 they were drawn from.
    assert adm.main(["check", str(adm_reference), "--inception-weights", inception_weights]) == 0
    check = json.loads(capsys.readouterr().out)
    with np.load(adm_reference) as ref:
        fd_own = frechet_low_rank(inception_features(ref["arr_0"], inception_weights).numpy(), ref["mu"], ref["sigma"])
    assert check["fd_reference_images_vs_stored_statistics"] == pytest.approx(fd_own, rel=1e-4) and fd_own > 0
    assert check["reference"]["sha256"] == record["reference"]["sha256"]


def fast_config(release_file, vae, out, batch_size) -> sm.SampleConfig:
    """paper_fid50k at 2 steps, 10 images, on the CPU."""
    return sm.SampleConfig(str(release_file), out=str(out), protocol="paper_fid50k", num_samples=10,
                           batch_size=batch_size, sampling_steps=2, vae=vae, device="cpu")


def same_npz(a, b) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return np.array_equal(x["arr_0"], y["arr_0"]) and np.array_equal(x["arr_1"], y["arr_1"])


def test_killed_run_resumes_to_the_same_npz(tmp_path, release_file, tiny_vae_dir, monkeypatch):
    def cfg(out):
        return fast_config(release_file, tiny_vae_dir, out, batch_size=4)

    whole = sm.run_sampling(cfg(tmp_path / "a"))
    calls, real_sample = [], scaling.diffusion.sample

    def dies_at_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while drawing chunk 2
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(scaling.evaluate, "sample", dies_at_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        sm.run_sampling(cfg(tmp_path / "b"))
    calls.clear()
    monkeypatch.setattr(scaling.evaluate, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    resumed = sm.run_sampling(cfg(tmp_path / "b"))  # the same command again
    assert len(calls) == 1 and resumed["resumed_from_img"] == 8  # only the last chunk is drawn
    assert same_npz(whole["npz"], resumed["npz"])


def test_images_do_not_depend_on_the_number_of_gpus(tmp_path, release_file, tiny_vae_dir, monkeypatch):
    def cfg(out):
        return fast_config(release_file, tiny_vae_dir, out, batch_size=3)

    one = sm.run_sampling(cfg(tmp_path / "one"))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    for rank in (1, 0):  # two "GPUs": rank 1 draws chunks 1 and 3, rank 0 draws 0 and 2 and assembles
        monkeypatch.setattr(ev, "_dist", lambda r=rank: (r, 2))
        two = sm.run_sampling(cfg(tmp_path / "two"))
    assert two["world_size"] == 2 and same_npz(one["npz"], two["npz"])


def project_checkpoint(path):
    """A checkpoint of this project's layout for a pixel-space laptop run on animal_mnist at 8 px."""
    from scaling.config import RunConfig, config_to_dict
    from scaling.data import DataConfig

    cfg = RunConfig(patch=4, data=DataConfig(image_size=8))
    torch.manual_seed(0)
    ema = randomize_(build_model("laptop_s", 4, input_size=8, in_channels=1, num_classes=10), 1)
    raw = randomize_(build_model("laptop_s", 4, input_size=8, in_channels=1, num_classes=10), 2)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 10, "img_seen": 80,
                "rng": {}, "data": {}, "config": config_to_dict(cfg)}, path)
    return cfg, ema


def test_project_checkpoint_samples_its_ema_weights(tmp_path):
    path = tmp_path / "step_0000010.pt"
    cfg, ema = project_checkpoint(path)
    record = sm.run_sampling(sm.SampleConfig(str(path), out=str(tmp_path / "out"), protocol="study", num_samples=6,
                                             batch_size=6, sampling_steps=2, device="cpu"))
    assert record["checkpoint"]["kind"] == "project" and record["vae"] is None and record["image_size"] == 8
    y = torch.from_numpy(np.load(record["npz"])["arr_1"])
    assert torch.equal(y.sort().values, torch.arange(6) % 10)  # balanced labels: 6 distinct of 10 classes
    x = sample(ema.eval(), Diffusion(cfg.diffusion), y, (6, 1, 8, 8), num_steps=2, clip_denoised=True,
               generator=torch.Generator().manual_seed(batch_seed(0, 0)))
    assert np.array_equal(np.load(record["npz"])["arr_0"], to_uint8(x).permute(0, 2, 3, 1).numpy())


def test_project_checkpoint_scored_against_its_own_data(tmp_path, capsys):  # ~5 s: trains the domain classifier
    path = tmp_path / "step_0000010.pt"
    project_checkpoint(path)
    assert sm.main([str(path), "--protocol", "study", "--num-samples", "20", "--ref", "dataset", "--backend",
                    "domain", "--num-ref", "200", "--out", str(tmp_path / "out"), *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["metrics"]) == {"fd20_domain", "is20_domain", "precision20_domain", "recall20_domain"}
    assert out["metrics"]["fd20_domain"] > 0 and out["reference"]["kind"] == "dataset"
    assert out["reference"]["dataset"] == "animal_mnist" and out["reference"]["num_images"] == 200


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args, match", [
    (["missing.pt"], "checkpoint 'missing.pt' is not a file; allowed: a DiT state dict"),
    (["{ckpt}", "--image-size", "250"], "--image-size=250; allowed: a multiple of 8"),
    (["{ckpt}", "--model", "laptop_b"], "does not fit laptop_b/2 on 4x4 inputs: shape mismatch (weights vs "
                                        "model): pos_embed (1, 4, 64) vs (1, 4, 128)"),
    (["{ckpt}", "--image-size", "64"], "does not fit laptop_s/2 on 8x8 inputs: shape mismatch (weights vs model): "
                                       "pos_embed (1, 4, 64) vs (1, 16, 64)"),
    (["{ckpt}", "--ref", "nowhere.npz"], "--ref='nowhere.npz' is not a file"),
    (["{ckpt}", "--num-samples", "0"], "--num-samples=0; allowed: an integer >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, match, release_file, capsys):
    code = sm.main([a.format(ckpt=release_file) for a in args] + ["--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("python -m scaling.sample: error: ")
    assert match in err


def test_adm_reference_errors_are_one_line(tmp_path):
    np.savez(tmp_path / "samples_only.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"lacks mu, sigma \(has arr_0\); allowed: an ADM reference batch"):
        adm.read_adm_reference(tmp_path / "samples_only.npz")
    with pytest.raises(ValueError, match="'nothing.npz' is not a file; download the ADM evaluator's batch"):
        adm.read_adm_reference("nothing.npz")
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(4), sigma=np.eye(4))
    ref = adm.read_adm_reference(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match="samples are 16x16 px but the reference batch ref.npz is 8x8"):
        adm.score_against_adm(np.zeros((2, 16, 16, 3), np.uint8), ref, space=None)
    assert adm.adm_metric_name("fd", "inception", 50_000) == "fid50k_inception_adm"
    assert adm.adm_metric_name("fd", "inception_offline", 10_000) == "fd10k_inception_offline_adm"
    assert adm.adm_metric_name("is", "inception", 50_000) == "is50k_inception"


def test_help_documents_every_option(capsys):
    parser = sm.build_parser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    with pytest.raises(SystemExit) as e:
        sm.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and all(name in text for name in sm.PROTOCOLS)
    with pytest.raises(SystemExit) as e:
        sm.main(["x.pt", "--protocol", "folklore"])
    assert e.value.code == 2 and "invalid choice: 'folklore'" in capsys.readouterr().err
