import os
import tempfile

import torch

# Two CPU cores on CI: one thread per test process keeps timings predictable.
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))
os.environ.setdefault("WANDB_MODE", "disabled")
# Trained feature extractors and reference statistics go to a cache of this test session, never the user's.
os.environ.setdefault("DIT_SCALING_CACHE", tempfile.mkdtemp(prefix="dit-scaling-test-cache-"))
