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
