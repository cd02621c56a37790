"""Helpers shared by the test modules: the launcher as a user runs it, and weights with signal in them."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_launch(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m scaling.launch ARGS` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "scaling.launch", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Noise in every trainable parameter: adaLN-Zero's zero init would make every variant output zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def drawn_legend_texts(fig) -> list[str]:
    """Texts of every legend entry that a saved copy of `fig` shows: legends of the figure and of its axes (the
    ones kept with add_artist too), each checked to be visible and not clipped away by its axes, after a draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.legend import Legend

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    page = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # what bbox_inches="tight" saves, in px
    texts = []
    for leg in fig.findobj(Legend):
        if not leg.get_visible():
            continue
        box = leg.get_window_extent(renderer)
        clip = leg.get_clip_box()
        if leg.get_clip_on() and clip is not None and not (clip.x0 <= box.x0 + 1 and box.x1 - 1 <= clip.x1 and
                                                           clip.y0 <= box.y0 + 1 and box.y1 - 1 <= clip.y1):
            continue  # clipped by the axes: not (fully) drawn
        if not (page.x0 <= box.x0 + 1 and box.x1 - 1 <= page.x1 and page.y0 <= box.y0 + 1 and box.y1 - 1 <= page.y1):
            continue  # outside what is saved
        texts += [t.get_text() for t in leg.get_texts()]
    return texts


def hydra_master(config_name: str = "config", overrides: list[str] = ()):
    """(Hydra's config loader, the composed config with its hydra node) as the launcher's sweeper receives them,
    through Hydra's public compose API (the studies in sweeps/ are on its search path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from scaling.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides)) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # the sweeps are the grid's, not its
        master = compose(config_name, overrides=fixed, return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
    return loader, master
