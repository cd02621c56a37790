"""The studies (sweeps/, shipped inside the package as scaling/sweeps) on the config search path of this project's
application, so that `--config-name laptop` finds sweeps/laptop.yaml without --config-dir; a user's own
--config-dir is searched before them. Other Hydra applications in the environment are left alone."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from scaling.config import CONF_DIR, SWEEPS_DIR


class StudiesSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if any(e.path == f"file://{CONF_DIR}" or e.path == str(CONF_DIR) for e in search_path.get_path()):
            search_path.append(provider="dit-scaling-studies", path=f"file://{SWEEPS_DIR}")
