import os
import sys
import tempfile
from pathlib import Path

# One BLAS thread per test process (numpy's fits and bootstraps): with pytest-xdist two processes share 2 cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts beside the package, not installed
    sys.path.insert(0, str(ROOT))

# Two CPU cores on CI: one thread per test process keeps timings predictable.
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))
os.environ.setdefault("WANDB_MODE", "disabled")
# Trained feature extractors and reference statistics go to a cache of this test session, never the user's: the
# domain classifier trains once per session, for in-process tests and launched jobs alike. pytest-xdist's workers
# inherit the controller's (its writes are atomic: two workers that both miss it both train it, one file stays).
if not (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("DIT_SCALING_CACHE")):
    os.environ["DIT_SCALING_CACHE"] = tempfile.mkdtemp(prefix="dit-scaling-test-cache-")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The test session's cache directory (DIT_SCALING_CACHE)."""
    return Path(os.environ["DIT_SCALING_CACHE"])


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> str:
    """A randomly initialised diffusers AutoencoderKL with the SD VAE's configuration (sd-vae-ft-ema: 4 blocks,
    3 of which halve the resolution, 4 latent channels, SiLU, 32 norm groups), 32 channels wide instead of
    128..512 and one layer per block instead of two, saved as a local diffusers directory."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                        layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32,
                        scaling_factor=0.18215)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (`-n 2 --dist loadgroup`, pyproject's addopts) each test module runs on one worker, so
    its module fixtures (a trained study, a SLURM grid) are built once, and every SLURM test on the same worker:
    the test cluster has 2 CPUs and its tests wait on their jobs."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
