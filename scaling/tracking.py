"""wandb mirror of metrics.jsonl: optional, offline by default, never the source of truth.

Runs of one sweep share a wandb group; the run's wandb id is its run_id, so a resumed run continues the same
wandb run. The summary carries params, Gflops and the latest metrics so that a dashboard can plot FID against
Gflops across the group (README, "Dashboards"). No API key is ever written by this module.
"""

from dataclasses import dataclass, field

MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled  (online needs WANDB_API_KEY in the environment)
    project: str = "dit-scaling"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


class Tracker:
    """A thin mirror: `log(row)` and `summary(d)` go to wandb when it is on, and nowhere otherwise."""

    def __init__(self, cfg: WandbConfig, run_id: str, group: str, run_dir, config: dict, plan: dict, rank: int = 0):
        if cfg.mode not in MODES:
            raise ValueError(f"wandb.mode={cfg.mode!r}; allowed: {', '.join(MODES)}")
        self.run = None
        if cfg.mode == "disabled" or rank != 0:
            return
        import wandb

        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=group, name=run_id, id=run_id, resume="allow",
            tags=list(cfg.tags), mode=cfg.mode, dir=str(run_dir), config={**config, "plan": plan},
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.summary({k: plan[k] for k in ("params", "gflops_per_img", "tokens", "model", "patch", "block", "family")
                      if k in plan})

    def log(self, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(row["step"]))

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
