"""The launch step's one record, whatever ran and wherever."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Launched:
    """What the launch step hands back to the run: how it ran and what only the launcher knows."""
    launcher: str                              # local | msrun
    kind: str                                  # train | eval | benchmark | predict | export
    call_s: float = 0.0                        # the launch call itself (MindFormers start to end)
    first_step_unix: float | None = None       # training: when the first step ended (the slowest rank's)
    peak_rss_mb: float = 0.0                   # the largest process's peak (this one, or the largest rank's)
    figures: dict = field(default_factory=dict)        # eval / predict / export figures for result["measured"]
    generated: list = field(default_factory=list)      # predict: {"prompt", "text", ...} per prompt
    benchmark: dict = field(default_factory=dict)      # eval.tasks: lm-eval's metrics (benchmark.summary_of)
    node_rank: int | None = None               # msrun over several nodes: this node's share only
    ranks_here: list = field(default_factory=list)
