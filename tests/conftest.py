import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts beside the package, not installed
    sys.path.insert(0, str(ROOT))

# Two CPU cores on CI: one thread per test process keeps timings predictable.
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))
os.environ.setdefault("WANDB_MODE", "disabled")
# Trained feature extractors and reference statistics go to a cache of this test session, never the user's: the
# domain classifier trains once per session, for in-process tests and launched jobs alike.
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
