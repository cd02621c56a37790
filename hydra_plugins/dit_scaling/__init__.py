"""dit-scaling's Hydra plugins (found by Hydra in the hydra_plugins namespace, as its plugin interfaces require):

- sweeper.GridSweeper (hydra/sweeper=grid): composes and validates every grid point before anything runs, prints
  the dry-run plan, skips finished runs, hands the rest to the launcher wave by wave, then summarises;
- local_launcher.LocalPoolLauncher (hydra/launcher=local): a pool of processes on this machine, one GPU (or a
  share of the CPU) per job, largest job first, progress lines;
- slurm_launcher.GridSlurmLauncher (hydra/launcher=slurm): hydra-submitit-launcher's SLURM launcher that submits
  and returns (or follows its jobs without sacct), with eval jobs submitted by the training jobs.

Their schemas are registered by scaling.config.register_configs.
"""
