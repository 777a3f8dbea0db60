"""Puts <output root>/conf on Hydra's search path for qwen15_exp's apps, so that experiments tune writes there
(`+experiment=tuned/<name>`) compose without touching the installed package or passing --config-dir."""
from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class UserConfigSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from qwen15_exp.compose import conf_dir
        from qwen15_exp.paths import user_conf_dir
        ours = str(conf_dir())
        if any(ours in str(element.path) for element in search_path.get_path()):     # only qwen15_exp's apps
            search_path.append(provider="qwen15_exp-user", path=f"file://{user_conf_dir()}")
