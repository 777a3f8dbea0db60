"""The layout of one run: degrees, devices, nodes, batch and tokens per step. Pure (the launcher, which
depends on this machine, is chosen in launch/choose.py).

`Layout` is built once from the composed experiment (`layout_of`) and read by validate, the estimates, the
MindFormers config, the plan and the launchers, in the spirit of torchtitan's ParallelDims: the degrees are
read here and nowhere else, the derived figures are computed once, and `terms` names every degree for
messages. Its `name` is derived from the degrees (`dp4mp2`), so it stays true after overrides.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DEGREE_KEYS = (("dp", "data_parallel"), ("mp", "model_parallel"), ("pp", "pipeline_stage"),
               ("cp", "context_parallel"))
_NAME = re.compile("^" + "".join(rf"(?:{short}(?P<{short}>\d+))?" for short, _ in DEGREE_KEYS) + "$")


def parse_layout_name(name: str) -> dict[str, int] | None:
    """'dp2mp4' -> {'data_parallel': 2, 'model_parallel': 4}: the inverse of layout_name (None if the name
    does not read as degrees)."""
    m = _NAME.match(name or "")
    if not name or not m or not any(m.groupdict().values()):
        return None
    keys = dict(DEGREE_KEYS)
    return {keys[short]: int(v) for short, v in m.groupdict().items() if v}


def layout_name(dp: int, mp: int, pp: int, cp: int = 1) -> str:
    """'dp4mp2' from the degrees; 'single' when every degree is 1."""
    parts = [f"{short}{n}" for (short, _), n in zip(DEGREE_KEYS, (dp, mp, pp, cp)) if n != 1]
    return "".join(parts) or "single"


def degrees(parallel) -> tuple[int, int, int, int]:
    """(dp, mp, pp, cp) of a parallel config."""
    return tuple(getattr(parallel, key) for _, key in DEGREE_KEYS)


@dataclass(frozen=True)
class Layout:
    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    context_parallel: int
    micro_batch_num: int
    devices_per_node: int
    nodes: int
    global_batch: int              # samples per optimizer step
    tokens_per_step: int           # 0 for predict

    @property
    def devices(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage * self.context_parallel

    @property
    def devices_here(self) -> int:
        """Devices (workers) on one node: the devices split evenly over the nodes (validate checks it)."""
        return max(1, self.devices // self.nodes)

    @property
    def name(self) -> str:
        return layout_name(self.data_parallel, self.model_parallel, self.pipeline_stage, self.context_parallel)

    @property
    def terms(self) -> str:
        """'data_parallel=2 x model_parallel=4 x pipeline_stage=1' (context_parallel when used)."""
        terms = [f"{key}={getattr(self, key)}" for _, key in DEGREE_KEYS[:3]]
        if self.context_parallel != 1:
            terms.append(f"context_parallel={self.context_parallel}")
        return " x ".join(terms)


def micro_batch_samples(exp) -> int:
    """Samples one device passes through the network per micro-batch: phase.batch_size, times
    micro_batch_interleave_num, whose MicroBatchInterleaved wrapper takes that many batches and runs their
    halves interleaved (MindFormers multiplies the global batch by it too)."""
    return exp.phase.batch_size * exp.parallel.micro_batch_interleave_num


def layout_of(exp) -> Layout:
    p, ph, hw = exp.parallel, exp.phase, exp.hardware
    dp, mp, pp, cp = degrees(p)
    n_devices = dp * mp * pp * cp
    per_node = max(1, hw.devices_per_node)
    n_nodes = p.nodes or max(1, -(-n_devices // per_node))
    accumulation = p.micro_batch_num if pp > 1 else ph.gradient_accumulation_steps
    gb = micro_batch_samples(exp) * dp * accumulation
    return Layout(data_parallel=dp, model_parallel=mp, pipeline_stage=pp, context_parallel=cp,
                  micro_batch_num=p.micro_batch_num, devices_per_node=hw.devices_per_node, nodes=n_nodes,
                  global_batch=gb, tokens_per_step=gb * exp.data.seq_length if ph.run_mode != "predict" else 0)
