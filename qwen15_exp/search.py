"""The layout search: every valid layout of a job on a device budget, filtered by the memory estimate and
ranked by the throughput estimate. Pure arithmetic, no I/O (no MindSpore import): 72B over 64 nodes is
searched in seconds. The command around it (printing, writing the experiment, measuring) is tune.py.

The global batch stays what the job asks (tokens per step are the optimisation's, not the layout's): a
layout only splits it into data-parallel ranks x micro-batches x micro-batch size. Searched: dp, mp (dividing
the heads and KV heads, within a node), pp (with MindFormers' balanced split and a searched `offset` that
evens out the embedding and lm_head), micro-batch count and size (with micro_batch_interleave_num 1 or 2 under
model parallel), gradient accumulation, recompute (none / selective / full), sequence parallel, the parallel
optimizer and vocab_emb_dp.
"""
from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, replace

from qwen15_exp.adapt import adapt
from qwen15_exp.estimate.memory import estimate_memory, kv_heads, layer_params, stage_layers
from qwen15_exp.estimate.throughput import estimate_train, stated_error
from qwen15_exp.layout import layout_name, layout_of
from qwen15_exp.validate import divisors

RECOMPUTE = {"none": (False, False), "selective": (False, True), "full": (True, False)}


@dataclass(frozen=True)
class Candidate:
    dp: int
    mp: int
    pp: int
    batch_size: int               # samples per micro-batch per data-parallel rank
    accumulation: int             # micro_batch_num under a pipeline, gradient_accumulation_steps without
    recompute: str                # none | selective | full
    seq_parallel: bool
    parallel_optimizer: bool
    vocab_emb_dp: bool
    offset: tuple | int = 0
    interleave: int = 1           # micro_batch_interleave_num: batch_size x interleave samples per micro-batch

    @property
    def name(self) -> str:
        return layout_name(self.dp, self.mp, self.pp)

    def overrides(self) -> dict:
        """The keys this layout sets, as dotted config keys."""
        full, select = RECOMPUTE[self.recompute]
        return {
            "parallel.data_parallel": self.dp, "parallel.model_parallel": self.mp,
            "parallel.pipeline_stage": self.pp,
            "parallel.micro_batch_num": self.accumulation if self.pp > 1 else 1,
            "phase.gradient_accumulation_steps": 1 if self.pp > 1 else self.accumulation,
            "phase.batch_size": self.batch_size,
            "parallel.micro_batch_interleave_num": self.interleave,
            "phase.recompute.recompute": full, "phase.recompute.select_recompute": select,
            "parallel.use_seq_parallel": self.seq_parallel,
            "parallel.enable_parallel_optimizer": self.parallel_optimizer,
            "parallel.vocab_emb_dp": self.vocab_emb_dp,
            "parallel.offset": list(self.offset) if isinstance(self.offset, tuple) else self.offset,
        }

    def command_args(self) -> list[str]:
        return [f"{k}={format_value(v)}" for k, v in self.overrides().items()]


def format_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def apply(exp, c: Candidate):
    """The experiment with this layout: the keys of `c.overrides()` set on shallow copies of the groups they
    touch (the search builds thousands)."""
    groups = {"parallel": replace(exp.parallel, optimizer_shard=None, nodes=None, name=c.name),
              "phase": replace(exp.phase, recompute=replace(exp.phase.recompute))}
    for key, value in c.overrides().items():
        *path, leaf = key.split(".")
        node = groups[path[0]]
        for part in path[1:]:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return replace(exp, **groups)


def balanced_offset(num_layers: int, pp: int, head_layers: float):
    """An offset that evens the stages' work when the last stage also carries lm_head and the loss (worth
    `head_layers` layers): layers go from the last stage to the others, first to the earliest. 0 when the
    even split is already best."""
    base = stage_layers(num_layers, pp, 0)
    layers = list(base)
    while True:
        work = [n + (head_layers if i == pp - 1 else 0) for i, n in enumerate(layers)]
        heavy, light = work.index(max(work)), work.index(min(work))
        if work[heavy] - work[light] <= 1 or layers[heavy] <= 1:
            break
        layers[heavy] -= 1
        layers[light] += 1
    offset = tuple(n - b for n, b in zip(layers, base))
    return offset if any(offset) else 0


def head_layers(model) -> float:
    """lm_head's work in decoder layers (matmul parameters: vocab x h against a layer's)."""
    return model.vocab_size * model.hidden_size / layer_params(model)


def model_parallel_options(exp) -> list[int]:
    m, hw = exp.model, exp.hardware
    if not hw.supports.semi_auto_parallel:
        return [1]
    per_node = max(1, hw.devices_per_node)
    return [t for t in divisors(per_node) if m.num_heads % t == 0 and kv_heads(m) % t == 0]


def search_space(exp, devices: int, global_batch: int):
    """Every candidate layout of `devices` devices that keeps `global_batch` samples per step, before any
    estimate. Yields (candidate, None) or (None, reason it is structurally impossible)."""
    m = exp.model
    can_pipeline = exp.hardware.supports.semi_auto_parallel    # also what the parallel optimizer needs
    for mp in model_parallel_options(exp):
        if devices % mp:
            continue
        for pp in divisors(devices // mp):
            if pp > 1 and not can_pipeline:
                yield None, "pipeline stages need semi-auto parallel, which this hardware lacks"
                continue
            if pp > m.num_layers:
                yield None, f"more pipeline stages than the model's {m.num_layers} layers"
                continue
            dp = devices // (mp * pp)
            if global_batch % dp:
                yield None, f"data_parallel does not divide the global batch of {global_batch}"
                continue
            offsets = {0}
            if pp > 1:
                offsets.add(balanced_offset(m.num_layers, pp, head_layers(m)))
            for samples in divisors(global_batch // dp):        # per micro-batch and data-parallel rank
                accumulation = global_batch // dp // samples
                if pp == 1 and accumulation > 1 and not can_pipeline:
                    yield None, "gradient accumulation needs semi-auto parallel, which this hardware lacks"
                    continue
                if pp > 1 and accumulation < pp:
                    yield None, "fewer micro-batches than pipeline stages"
                    continue
                if mp > 1 and exp.data.seq_length % mp:
                    yield None, "sequence length not divisible by model_parallel"
                    continue
                # two interleaved halves of a micro-batch hide the model-parallel collectives of one behind
                # the other's compute (MindFormers' advice when model_parallel > 1)
                interleaves = (1, 2) if mp > 1 and samples % 2 == 0 else (1,)
                for recompute, interleave in itertools.product(RECOMPUTE, interleaves):
                    batch_size = samples // interleave
                    for sp in ((True, False) if mp > 1 else (False,)):
                        for po in ((True, False) if dp > 1 and can_pipeline else (False,)):
                            for vocab_dp in ((True, False) if mp > 1 else (exp.parallel.vocab_emb_dp,)):
                                for offset in offsets:
                                    yield Candidate(dp, mp, pp, batch_size, accumulation, recompute, sp, po,
                                                    vocab_dp, offset, interleave), None


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    memory_gb: float
    budget_gb: float
    tight: bool
    tokens_per_s: float
    tokens_per_s_per_device: float
    limit: str                     # the largest term of the step
    terms_s: dict


LIMIT_NAMES = {"compute": "compute", "pipeline_bubble": "bubble", "tensor_parallel_comm": "TP comm",
               "data_parallel_comm": "DP comm", "memory_traffic": "memory traffic", "launch_overhead": "launches"}


def score(exp, c: Candidate) -> Scored | str:
    """The candidate's estimates, or why it does not fit."""
    run = apply(exp, c)
    layout, adapted = layout_of(run), adapt(run)
    mem = estimate_memory(run, layout, adapted)
    if not mem.fits:
        return f"over the memory budget (> {mem.budget_gb:.0f} GB beyond the estimate's uncertainty)"
    est = estimate_train(run, layout, adapted)
    limit = max(est.terms_s, key=est.terms_s.get)
    return Scored(c, mem.total_gb, mem.budget_gb, mem.tight, est.tokens_per_s, est.tokens_per_s_per_device,
                  LIMIT_NAMES.get(limit, limit), est.terms_s)


@dataclass
class TuneResult:
    devices: int
    global_batch: int
    searched: int
    rejected: Counter
    kept: list                      # Scored, fastest first
    seconds: float
    uncertainty: float = 0.0        # +- share of every throughput estimate (the hardware's)
    rank_resolution: float = 0.0    # estimates closer than this share rank equal

    @property
    def best(self) -> list:
        """The fastest variant of each layout (degrees, micro-batch split, and whether whole layers are
        recomputed, which costs about a quarter more compute), fastest first: the settings that barely change the
        estimate (selective recompute, sequence parallel, parallel optimizer, vocab_emb_dp, offset) do not
        crowd the top k."""
        seen, out = set(), []
        for s in self.kept:
            c = s.candidate
            key = (c.dp, c.mp, c.pp, c.batch_size * c.interleave, c.accumulation, c.recompute == "full")
            if key not in seen:
                seen.add(key)
                out.append(s)
        return out


def tune(exp, devices: int, global_batch: int) -> TuneResult:
    t0 = time.perf_counter()
    rejected, kept, searched = Counter(), [], 0
    for candidate, impossible in search_space(exp, devices, global_batch):
        searched += 1
        if candidate is None:
            rejected[impossible] += 1
            continue
        scored = score(exp, candidate)
        if isinstance(scored, str):
            rejected[scored] += 1
        else:
            kept.append(scored)
    kept.sort(key=lambda s: -s.tokens_per_s)
    return TuneResult(devices, global_batch, searched, rejected, kept, time.perf_counter() - t0, *stated_error(exp))


def describe(c: Candidate) -> str:
    parts = [c.name, f"b{c.batch_size}x{c.accumulation}"]
    if c.interleave > 1:
        parts.append(f"il{c.interleave}")
    if c.recompute != "none":
        parts.append(f"rc:{c.recompute}")
    if c.seq_parallel:
        parts.append("sp")
    if c.parallel_optimizer:
        parts.append("po")
    if c.mp > 1 and c.vocab_emb_dp:
        parts.append("vdp")
    if c.offset != 0:
        parts.append("off" + format_value(list(c.offset)))
    return " ".join(parts)
