"""benchmarks/bench.py: the smoke suite's output schema, and that the compared variants compute the same thing."""

import copy
import csv
import json

import pytest
import torch

from benchmarks import bench
from helpers import randomize_
from scaling.diffusion import Diffusion, DiffusionConfig, sample
from scaling.flops import closed_form_gflops

CPU = torch.device("cpu")


def inputs(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 1000, (n,), generator=g))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = bench.main(["--suite", "smoke", "--device", "cpu", "--out", str(out), "--tag", "test"])
    return result, out


# ----------------------------------------------------------------------------- the smoke suite's output


def test_smoke_suite_writes_json_csv_txt_with_schema(smoke):
    result, out = smoke
    paths = {ext: out / f"smoke-test.{ext}" for ext in ("json", "csv", "txt")}
    assert all(p.is_file() for p in paths.values())
    saved = json.loads(paths["json"].read_text())
    assert {"suite", "machine", "versions", "settings", "rows", "comparisons", "target", "gap"} <= set(saved)
    assert saved["machine"]["device"] == "cpu" and saved["machine"]["torch_threads"] >= 1
    assert saved["machine"]["wall_s"] > 0 and "load_avg_1min_start" in saved["machine"]
    assert saved["versions"]["torch"] == torch.__version__
    rows = saved["rows"]
    assert {r["kind"] for r in rows} == set(bench.KINDS.values())  # one of each measurement kind
    for r in rows:
        assert "error" not in r, r
        assert r["iters"] >= 1 and r["warmup"] >= 1 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        rate = {"matmul": "gflop_per_s", "bandwidth": "gb_per_s"}.get(r["kind"], "img_per_s")
        assert r[rate] > 0, r
    for r in rows:
        if r["kind"] in ("train", "sample"):
            assert r["gflop_per_s"] > 0 and 0 < r["frac_mm_peak"] and r["mfu"] is None  # no GPU: no MFU
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == [r["label"] for r in rows]
    assert {"kind", "label", "img_per_s", "median_s", "iters", "warmup", "batch_img"} <= set(table[0])
    assert paths["txt"].read_text() == bench.format_report(saved)
    assert "speedup on/off" in paths["txt"].read_text() and "Gap analysis" in paths["txt"].read_text()


def test_model_flops_use_the_closed_form_count(smoke):
    """gflop_per_s = 3 x 2 x forward Gflops x img/s (train), 250 x 2 x 2 x Gflops x img/s (guided sampling)."""
    rows = {r["label"]: r for r in smoke[0]["rows"]}
    train, samp = rows["train fast"], rows["sample"]
    gflops = closed_form_gflops(train["model"], train["patch"], train["input_size"])
    assert train["gflop_per_s"] / train["img_per_s"] == pytest.approx(6 * gflops, rel=0.01)
    assert samp["gflop_per_s"] / samp["img_per_s"] == pytest.approx(250 * 4 * gflops, rel=0.01)
    # sampling img/s is per 250-step image, scaled from the timed steps
    assert samp["img_per_s"] == pytest.approx(samp["batch_img"] * samp["steps_timed"] / (250 * samp["median_s"]))
    assert train["img_per_s"] == pytest.approx(train["batch_img"] / train["median_s"])


def test_comparisons_gap_and_memory_option(smoke):
    result = smoke[0]
    rows = {r["label"]: r for r in result["rows"]}
    (comp,) = result["comparisons"]
    assert comp["speedup"] == pytest.approx(rows["train fast"]["img_per_s"] / rows["train plain"]["img_per_s"])
    assert result["target"]["ratio"] == pytest.approx(comp["speedup"])
    # gradient checkpointing keeps only the block inputs for the backward pass
    assert 0 < rows["train ckpt"]["saved_act_mib"] < 0.7 * rows["train fast"]["saved_act_mib"]
    gap = result["gap"]
    assert all(v > 0 for v in gap["phase_s"].values())
    assert gap["step_s"] == pytest.approx(sum(gap["phase_s"].values()))
    assert gap["matmul_s"] > 0 and gap["other_s"] > 0 and gap["mlp_gemm_gflop_per_s"] > 0
    assert gap["mm_peak_gflop_per_s"] > 0 and gap["copy_gb_per_s"] > 0
    # the time budget adds up to the step: the FLOPs at peak + every cause of the gap
    assert sum(gap["budget_s"].values()) == pytest.approx(gap["step_s"])
    assert gap["budget_s"]["ideal_s"] == pytest.approx(gap["model_gflop_per_step"] / gap["mm_peak_gflop_per_s"])


def test_saved_activation_count_matches_hand_count():
    """Linear saves its input (its weight is a parameter: not counted), ReLU its output: 8x16 + 8x32 fp32."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
    x = torch.randn(8, 16)
    assert bench.saved_activation_mib(lambda: model(x).sum(), model) * 2**20 == (8 * 16 + 8 * 32) * 4
    ckpt = torch.nn.Sequential(bench.Checkpointed(model))  # keeps only the block input
    assert bench.saved_activation_mib(lambda: ckpt(x).sum(), ckpt) * 2**20 == 8 * 16 * 4


# ----------------------------------------------------------------------------- apples to apples


def test_unfused_attention_reference_matches_sdpa_model():
    """The plain reference computes the same function as the SDPA model (DiT-S/8, the CPU target's model)."""
    torch.manual_seed(0)
    fused = randomize_(bench.make_dit("dit_s", 8, 32, "sdpa")).eval()
    plain = bench.make_dit("dit_s", 8, 32, "unfused").eval()
    plain.load_state_dict(fused.state_dict())
    assert sum(type(m) is bench.UnfusedAttention for m in plain.modules()) == 12
    assert not any(type(m) is bench.UnfusedAttention for m in fused.modules())
    x, t, y = inputs(3, 32)
    with torch.no_grad():
        a, b = fused(x, t, y), plain(x, t, y)
    assert a.abs().max() > 0.1  # the comparison carries signal
    assert (a - b).abs().max() < 1e-5


def test_unfused_attention_gradients_match():
    fused = randomize_(bench.make_dit("laptop_s", 2, 16, "sdpa"))
    plain = copy.deepcopy(fused)
    for m in plain.modules():
        if type(m) is bench.Attention:
            m.__class__ = bench.UnfusedAttention
    x, t, y = inputs(2, 16)
    fused.eval()(x, t, y).square().mean().backward()
    plain.eval()(x, t, y).square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_gradient_checkpointing_same_loss_and_grads():
    base = randomize_(bench.make_dit("laptop_s", 4, 16, "sdpa"))
    ckpt = bench.make_dit("laptop_s", 4, 16, "sdpa", grad_ckpt=True)
    ckpt.load_state_dict({k: base.state_dict()[k.replace(".block.", ".")] for k in ckpt.state_dict()})
    assert all(isinstance(b, bench.Checkpointed) for b in ckpt.blocks)
    x, t, y = inputs(2, 16)
    diffusion = Diffusion(DiffusionConfig())
    losses = []
    for model in (base, ckpt):
        torch.manual_seed(1)
        loss = diffusion.training_losses(model.eval(), x, t, y)["loss"].mean()
        loss.backward()
        losses.append(loss)
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    for p, q in zip(base.parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4)


def test_split_guidance_matches_batched_forward_and_grad_on_sampler_records():
    model = randomize_(bench.make_dit("laptop_s", 4, 16, "sdpa")).eval()
    x, t, y = inputs(4, 16)
    with torch.no_grad():
        assert (bench.SplitGuidance(model)(x, t, y) - model(x, t, y)).abs().max() < 1e-5
    # the "grad on" variant is the same sampler with autograd recording (what forgetting torch.no_grad costs)
    y2 = torch.tensor([1, 2])
    kwargs = dict(num_steps=2, cfg_scale=4.0, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        recorded = sample.__wrapped__(model, Diffusion(DiffusionConfig()), y2, (2, 4, 16, 16), **kwargs)
        plain = sample(model, Diffusion(DiffusionConfig()), y2, (2, 4, 16, 16),
                       **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert recorded.requires_grad and not plain.requires_grad
    assert torch.allclose(recorded.detach(), plain, atol=1e-5)


# ----------------------------------------------------------------------------- suites and bad input


@pytest.mark.parametrize("name,compile", [("cpu", False), ("cpu", True), ("gpu", True), ("smoke", False)])
def test_suites_are_consistent(name, compile):
    suite = bench.suite_specs(name, {"dit_xl/2": 64}, compile)
    labels = [s.label for s in suite.specs]
    assert len(labels) == len(set(labels))
    for _, on, off in suite.comparisons:
        assert on in labels and off in labels and on != off
    if suite.target:
        assert set(suite.target) <= set(labels)
    assert any(isinstance(s, bench.TrainSpec) and s.compile for s in suite.specs) == (compile and name != "smoke")
    if name == "gpu":
        assert any(s.label == "train XL/2 b64 best" and s.batch_img == 64 for s in suite.specs)


def test_bad_values_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"attention='bogus'; allowed: sdpa, unfused, flash"):
        bench.TrainSpec("x", attention="bogus")
    with pytest.raises(ValueError, match="needs amp='bf16'"):
        bench.TrainSpec("x", attention="flash")
    with pytest.raises(ValueError, match=r"suite='nope'; allowed: cpu, gpu, smoke"):
        bench.main(["--suite", "nope"])
    with pytest.raises(ValueError, match="allowed: dit_xl/2=N"):
        bench.parse_batch(["dit_xl/2=lots"])
    with pytest.raises(ValueError, match="cfg_scale=1.0"):
        bench.SampleSpec("x", cfg_scale=1.0)


def test_cuda_only_settings_are_recorded_as_errors_on_cpu():
    spec = bench.TrainSpec("tf32 on cpu", "laptop_s", 8, 2, input_size=16, tf32=True, warmup=1, iters=1)
    row = bench.run_spec(spec, CPU, {}, None)
    assert row["error"].startswith("ValueError: tf32 on cpu: tf32=True needs a CUDA device")
    assert "img_per_s" not in row


def test_train_cpu_benchmark_trains_both_forms_to_the_same_weights(tmp_path):
    """benchmarks/train_cpu.py: a few real training steps of each laptop model with the decoder term for every row
    and for the rows at t = 0 only; the weights after the last step are the same to the bit."""
    from benchmarks import train_cpu

    threads = torch.get_num_threads()
    try:
        assert train_cpu.main(["--steps", "2", "--out", str(tmp_path / "t.txt")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [ln.split() for ln in (tmp_path / "t.txt").read_text().splitlines() if ln.startswith("laptop_")]
    assert [r[0] for r in rows] == [f"{m}/4" for m in train_cpu.MODELS]
    assert all(r[-1] == "True" and float(r[1]) > 0 and float(r[2]) > 0 for r in rows), rows
