"""Validate step: every semantic problem of an Experiment, collected before anything runs.

Each problem names the group, the key, the values involved and a fix. Pure: imports nothing heavy.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from qwen15_exp.errors import UserError
from qwen15_exp.launch.script import ENV_KEY
from qwen15_exp.estimate.memory import estimate_memory, kv_heads, stage_layers
from qwen15_exp.layout import DEGREE_KEYS, layout_of


@dataclass(frozen=True)
class Problem:
    group: str
    key: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.group}] {self.key}: {self.message}\n    fix: {self.fix}"


def divisors(n: int) -> list[int]:
    """In O(sqrt n): a budget of 10^9 devices is answered at once."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_numbers(exp) -> list[Problem]:
    """Numbers that must be in range (the allowed words are Enums in the schema, checked at compose time)."""
    out = []
    counts = [("parallel", key) for _, key in DEGREE_KEYS] + [
        ("parallel", "micro_batch_num"), ("parallel", "micro_batch_interleave_num"),
        ("parallel", "gradient_aggregation_group"), ("phase", "batch_size"), ("phase", "epochs"),
        ("phase", "gradient_accumulation_steps"), ("data", "seq_length")]
    for group, key in counts:
        v = getattr(getattr(exp, group), key)
        if v < 1:
            out.append(Problem(group, f"{group}.{key}", f"is {v}, must be at least 1", f"set {group}.{key}=1"))
    if exp.phase.max_steps is not None and exp.phase.max_steps < 1:
        out.append(Problem("phase", "phase.max_steps", f"is {exp.phase.max_steps}, must be at least 1",
                           "set phase.max_steps to a positive number of steps, or null to run every epoch"))
    if not 0 <= exp.phase.seed < 2 ** 32:               # MindSpore's set_seed takes an unsigned 32-bit seed
        out.append(Problem("phase", "phase.seed", f"is {exp.phase.seed}, must be in 0 .. 2^32-1",
                           "set phase.seed to a non-negative number, e.g. phase.seed=42"))
    ck = exp.phase.checkpoint
    if ck.keep_max < 2:
        out.append(Problem("phase", "phase.checkpoint.keep_max",
                           f"is {ck.keep_max}: a kill during a save can then leave no usable checkpoint",
                           "keep at least 2 (the default); phase.checkpoint.keep_after_success bounds what "
                           "stays on disk after the run"))
    if ck.keep_after_success < 0 or ck.every_minutes <= 0 or (ck.save_steps is not None and ck.save_steps < 1):
        out.append(Problem("phase", "phase.checkpoint",
                           f"save_steps={ck.save_steps}, every_minutes={ck.every_minutes}, keep_after_success="
                           f"{ck.keep_after_success}: steps and minutes must be positive, kept files not negative",
                           "e.g. phase.checkpoint.save_steps=500 or phase.checkpoint.every_minutes=10"))
    lora = exp.phase.lora
    if lora is not None:
        if lora.rank < 1 or lora.alpha <= 0 or not (0 <= lora.dropout < 1):
            out.append(Problem("phase", "phase.lora", f"rank={lora.rank}, alpha={lora.alpha}, dropout={lora.dropout}",
                               "use rank >= 1, alpha > 0 and 0 <= dropout < 1 (e.g. rank 8, alpha 16, dropout 0.05)"))
        try:
            re.compile(lora.target_modules)
        except re.error as e:
            out.append(Problem("phase", "phase.lora.target_modules", f"{lora.target_modules!r} is not a regex: {e}",
                               "use MindFormers' form, e.g. '.*wq|.*wk|.*wv|.*wo'"))
    out += check_rates(exp)
    off = exp.parallel.offset
    if not (isinstance(off, int) or (isinstance(off, (list, tuple)) and all(isinstance(o, int) for o in off))):
        out.append(Problem("parallel", "parallel.offset", f"{off!r} is neither an integer nor a list of integers",
                           "use parallel.offset=0 or one integer per pipeline stage, e.g. [-1,1,1,-1]"))
    return out


def finite_in(v, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> bool:
    """v is a finite number in [lo, hi] (open ends where asked)."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


def check_rates(exp) -> list[Problem]:
    """Rates and factors that train nonsense rather than fail (a negative or NaN learning rate trains, exit 0)."""
    ph, g = exp.phase, exp.phase.generation
    lr, opt, ls = ph.lr_schedule, ph.optimizer, ph.loss_scale
    rules = [
        ("phase.lr_schedule.learning_rate", lr.learning_rate, finite_in(lr.learning_rate, 0, lo_open=True),
         "a positive finite number, e.g. 1e-5"),
        ("phase.lr_schedule.lr_end", lr.lr_end, lr.lr_end is None or finite_in(lr.lr_end, 0),
         "a non-negative finite number, or null"),
        ("phase.lr_schedule.warmup_ratio", lr.warmup_ratio, finite_in(lr.warmup_ratio, 0, 1), "between 0 and 1"),
        ("phase.optimizer.weight_decay", opt.weight_decay, finite_in(opt.weight_decay, 0), "a non-negative number"),
        ("phase.optimizer.eps", opt.eps, finite_in(opt.eps, 0, lo_open=True), "a small positive number, e.g. 1e-8"),
        ("phase.optimizer.betas", opt.betas, len(opt.betas) == 2 and all(finite_in(b, 0, 1, hi_open=True)
                                                                          for b in opt.betas),
         "two numbers in [0, 1), e.g. [0.9, 0.95]"),
        ("phase.loss_scale.value", ls.value, finite_in(ls.value, 0, lo_open=True), "a positive number, e.g. 4096"),
        ("phase.loss_scale.factor", ls.factor, finite_in(ls.factor, 1), "a number of at least 1, e.g. 2"),
        ("phase.loss_scale.window", ls.window, finite_in(ls.window, 1), "a positive number of steps, e.g. 1000"),
        ("phase.generation.top_p", g.top_p, finite_in(g.top_p, 0, 1, lo_open=True), "in (0, 1], e.g. 0.8"),
        ("phase.generation.top_k", g.top_k, finite_in(g.top_k, 0), "0 (off) or a positive number"),
        ("phase.generation.temperature", g.temperature, g.temperature is None or finite_in(g.temperature, 0,
                                                                                            lo_open=True),
         "a positive number, or null"),
        ("phase.generation.repetition_penalty", g.repetition_penalty,
         finite_in(g.repetition_penalty, 0, lo_open=True), "a positive number (1.0: off)"),
    ]
    return [Problem("phase", key, f"is {value!r}", f"use {what}") for key, value, ok, what in rules if not ok]


HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*\.?")
SLURM_WORD = re.compile(r"[A-Za-z0-9_.,-]{1,128}")


def is_host(text: str) -> bool:
    """A host name (RFC 1123) or an IPv4/IPv6 address."""
    import ipaddress
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(HOST_NAME.fullmatch(text))


def check_launch_values(exp) -> list[Problem]:
    L, out = exp.launch, []
    if not is_host(L.master_addr):
        out.append(Problem("launch", "launch.master_addr", f"{L.master_addr!r} is neither a host name nor an address",
                           "give node 0's address or host name, e.g. launch.master_addr=10.0.0.1"))
    if not 1 <= L.master_port <= 65535:
        out.append(Problem("launch", "launch.master_port", f"is {L.master_port}", "use a port in 1..65535"))
    part = L.slurm.partition
    if part and not SLURM_WORD.fullmatch(part):
        out.append(Problem("launch", "launch.slurm.partition", f"{part!r} is not a Slurm partition name",
                           "use letters, digits, '_', '-', '.' (several partitions: comma-separated)"))
    if L.socket_ifname and not re.fullmatch(r"[A-Za-z0-9_.:,^=-]{1,64}", L.socket_ifname):
        out.append(Problem("launch", "launch.socket_ifname", f"{L.socket_ifname!r} is not an interface name",
                           "e.g. launch.socket_ifname=eth0 (HCCL's ^ and = prefixes are allowed)"))
    return out


def check_phase_inputs(exp) -> list[Problem]:
    """What the phase needs and whether its own files exist: eval data, weights to score, adapters, export."""
    out = []
    ev = exp.phase.eval
    if ev.every_steps is not None and (ev.every_steps < 1 or not ev.input):
        out.append(Problem("phase", "phase.eval", f"every_steps={ev.every_steps}, input={ev.input!r}",
                           "evaluate during training with phase.eval.every_steps=<N> (N >= 1) and "
                           "phase.eval.input=<a file in data.format, or a MindRecord of data.seq_length-token rows>"))
    elif ev.input and not Path(ev.input).exists():
        out.append(Problem("phase", "phase.eval.input", f"{ev.input} not found", "give an existing file or folder"))
    if exp.phase.run_mode == "eval" and not exp.phase.load_checkpoint:
        out.append(Problem("phase", "phase.load_checkpoint", "phase=eval scores a model, but none is given",
                           "set phase.load_checkpoint=<checkpoint file or Hugging Face folder>"))
    if exp.phase.export and exp.phase.run_mode != "predict":
        out.append(Problem("phase", "phase.export", f"export of a {exp.phase.run_mode} phase",
                           "use phase=export (the predict network, written as MindIR)"))
    if exp.phase.adapter:
        if not Path(exp.phase.adapter).exists():
            out.append(Problem("phase", "phase.adapter", f"{exp.phase.adapter} not found",
                               "give a PEFT folder (adapter_config.json) or the dir of a phase=lora run"))
        elif not (exp.phase.load_checkpoint and Path(exp.phase.load_checkpoint).exists()):
            out.append(Problem("phase", "phase.adapter", f"adapters need their base weights on this machine; "
                               f"phase.load_checkpoint={exp.phase.load_checkpoint!r}",
                               "set phase.load_checkpoint to the base checkpoint or Hugging Face folder the "
                               "adapters were trained on (they are merged here, before the launch)"))
    if exp.hardware.device_target == "auto":
        out.append(Problem("hardware", "hardware.device_target", "auto is only for the hardware=auto profile",
                           "choose hardware=cpu, hardware=atlas_800t_a2 or hardware=atlas_900_a2_podc"))
    return out


def check_benchmark(exp, L) -> list[Problem]:
    """eval.*: benchmarks run in phase=eval, on one device, with sane numbers and existing task folders."""
    e, out = exp.eval, []
    if not e.tasks:
        return out
    if exp.phase.run_mode != "eval":
        out.append(Problem("eval", "eval.tasks", f"benchmarks with phase={exp.phase.name}",
                           "run them with phase=eval (and phase.load_checkpoint=<the weights to score>)"))
    if L is not None and L.devices > 1:
        out.append(Problem("eval", "eval.tasks", f"benchmarks on {L.devices} devices ({L.terms})",
                           "run them on one device (parallel=single): qwen15_exp's lm-eval model is not sharded"))
    for key, value, low in (("batch_size", e.batch_size, 1), ("max_gen_toks", e.max_gen_toks, 1),
                            ("num_fewshot", e.num_fewshot, 0), ("max_length", e.max_length, 2)):
        if value is not None and value < low:
            out.append(Problem("eval", f"eval.{key}", f"{value}", f"give an integer >= {low}"))
    if e.limit is not None and not (e.limit > 0 and (e.limit < 1 or float(e.limit).is_integer())):
        out.append(Problem("eval", "eval.limit", f"{e.limit}", "give a count of documents per task (e.g. 100) or "
                           "a fraction below 1 (e.g. 0.1)"))
    if e.fewshot_as_multiturn and not e.apply_chat_template:
        out.append(Problem("eval", "eval.fewshot_as_multiturn", "true without eval.apply_chat_template",
                           "set eval.apply_chat_template=true too (the turns are the chat template's)"))
    if e.max_length and e.max_length > exp.model.max_position_embedding:
        out.append(Problem("eval", "eval.max_length", f"{e.max_length}, more than the model's "
                           f"{exp.model.max_position_embedding} positions", "lower it"))
    for path in e.include_path:
        if not Path(path).is_dir():
            out.append(Problem("eval", "eval.include_path", f"{path} is not a folder",
                               "give folders of lm-eval task YAMLs"))
    for task in e.tasks:
        if task.endswith((".yaml", ".yml")) and not Path(task).is_file():
            out.append(Problem("eval", "eval.tasks", f"{task} not found", "give an existing task YAML, or a task name"))
    return out


def check_devices(exp, L) -> list[Problem]:
    p, hw = exp.parallel, exp.hardware
    n_dev, per_node, terms = L.devices, hw.devices_per_node, L.terms
    out = []
    if p.nodes:
        if n_dev % p.nodes or n_dev // p.nodes > per_node:
            out.append(Problem(
                "parallel", "parallel.nodes",
                f"{terms} = {n_dev} devices do not split evenly over nodes={p.nodes} with at most "
                f"devices_per_node={per_node} of hardware {hw.name} on each",
                f"set parallel.nodes={max(1, -(-n_dev // per_node))} or change the degrees so their product "
                f"is a multiple of {p.nodes} and at most {p.nodes * per_node}"))
    elif n_dev > per_node and n_dev % per_node:
        out.append(Problem(
            "parallel", "parallel.data_parallel",
            f"{terms} = {n_dev} devices does not fill whole nodes of {per_node} ({hw.name})",
            f"use a device count that is a multiple of {per_node}, e.g. data_parallel="
            f"{max(1, (n_dev // per_node + 1) * per_node // (L.model_parallel * L.pipeline_stage))}"))
    if hw.device_target == "CPU":
        if L.model_parallel > 1 or L.pipeline_stage > 1 or L.context_parallel > 1:
            out.append(Problem(
                "parallel", "parallel.model_parallel",
                f"{terms}: model/pipeline/context parallel needs semi-auto parallel, which MindSpore does not "
                "run on CPU ('Invalid backend: CPU')",
                "on CPU use data parallel only (parallel=single or parallel=dp2), or plan it for Ascend with "
                "hardware=atlas_800t_a2"))
        if n_dev > per_node:
            out.append(Problem(
                "parallel", "parallel.data_parallel",
                f"data_parallel={L.data_parallel} CPU workers on a machine with {per_node} cores",
                f"use at most data_parallel={per_node} on this CPU"))
    return out


def check_lora_targets(exp) -> list[Problem]:
    from fnmatch import fnmatch

    from qwen15_exp.estimate.memory import lora_targets
    from qwen15_exp.weights.shapes import expected_shapes
    lora, out = exp.phase.lora, []
    if lora is None:
        return out
    if not lora_targets(exp.model, lora):
        out.append(Problem("phase", "phase.lora.target_modules",
                           f"{lora.target_modules!r} matches no Linear layer of model {exp.model.name} (MindFormers "
                           "matches attribute names: wq wk wv wo of attention, w1 w2 w3 of feed_forward, lm_head)",
                           "e.g. phase.lora.target_modules='.*wq|.*wk|.*wv|.*wo'"))
    # MindFormers' freeze_exclude matches with fnmatch: a regex such as '.*norm.*' silently keeps nothing trainable
    names = list(expected_shapes(exp.model))
    for pattern in lora.trainable:
        if not any(fnmatch(name, pattern) for name in names):
            out.append(Problem("phase", "phase.lora.trainable",
                               f"{pattern!r} matches no parameter of model {exp.model.name} (names look like "
                               f"{names[1]}; the patterns are shell-style, as MindFormers' freeze_exclude, not regexes)",
                               "e.g. phase.lora.trainable=['*norm*'] (every norm) or ['*tok_embeddings*']"))
    return out


def check_model_vs_parallel(exp, L) -> list[Problem]:
    m, p = exp.model, exp.parallel
    mp, out = L.model_parallel, []
    ok_mp = [d for d in divisors(m.num_heads) if kv_heads(m) % d == 0]
    if m.hidden_size % m.num_heads:
        out.append(Problem("model", "model.hidden_size",
                           f"hidden_size={m.hidden_size} is not divisible by num_heads={m.num_heads}",
                           "use a hidden_size that is a multiple of num_heads"))
    per_node = max(1, exp.hardware.devices_per_node)
    within_node = [d for d in ok_mp if d <= per_node] or [1]   # tensor parallel stays inside a node
    nearest = min(within_node, key=lambda d: (abs(d - mp), -d))
    if m.num_heads % mp:
        out.append(Problem(
            "parallel", "parallel.model_parallel",
            f"num_heads={m.num_heads} of model {m.name} is not divisible by model_parallel={mp}",
            f"use a model_parallel that divides the heads and fits in one node of {per_node}: one of "
            f"{within_node} (e.g. parallel.model_parallel={nearest})"))
    elif kv_heads(m) % mp:
        out.append(Problem(
            "parallel", "parallel.model_parallel",
            f"n_kv_heads={kv_heads(m)} of model {m.name} (grouped-query attention) is not divisible by "
            f"model_parallel={mp}",
            f"use a model_parallel that divides both num_heads={m.num_heads} and n_kv_heads={kv_heads(m)}: "
            f"one of {within_node} (e.g. parallel.model_parallel={nearest})"))
    if m.intermediate_size % mp:
        out.append(Problem("parallel", "parallel.model_parallel",
                           f"intermediate_size={m.intermediate_size} is not divisible by model_parallel={mp}",
                           f"use a model_parallel in {[d for d in ok_mp if m.intermediate_size % d == 0]}"))
    if not p.vocab_emb_dp and m.vocab_size % mp:
        out.append(Problem(
            "parallel", "parallel.vocab_emb_dp",
            f"vocab_size={m.vocab_size} is not divisible by model_parallel={mp} and the embedding is "
            f"sharded (vocab_emb_dp=false)",
            "set parallel.vocab_emb_dp=true or use a model_parallel that divides the vocabulary"))
    pp = L.pipeline_stage
    if isinstance(p.offset, (list, tuple)) and len(p.offset) != pp:
        out.append(Problem(
            "parallel", "parallel.offset",
            f"offset has {len(p.offset)} entries {list(p.offset)} but pipeline_stage={pp}",
            f"give one offset per stage (summing to 0), e.g. parallel.offset=[{','.join(['0'] * pp)}], "
            "or parallel.offset=0"))
    offset_ok = not (isinstance(p.offset, (list, tuple)) and len(p.offset) != pp)
    if pp > 1:
        if m.num_layers < pp:
            out.append(Problem("parallel", "parallel.pipeline_stage",
                               f"pipeline_stage={pp} is more than num_layers={m.num_layers} of model {m.name}",
                               f"use at most {m.num_layers} stages"))
        elif offset_ok:
            layers = stage_layers(m.num_layers, pp, p.offset)
            if sum(layers) != m.num_layers or min(layers) < 1:
                out.append(Problem(
                    "parallel", "parallel.offset",
                    f"num_layers={m.num_layers} over pipeline_stage={pp} with offset={p.offset} gives stages "
                    f"of {layers} layers (sum {sum(layers)})",
                    "choose offsets that sum to 0 and leave every stage at least one layer"))
        if L.micro_batch_num < pp:
            out.append(Problem(
                "parallel", "parallel.micro_batch_num",
                f"micro_batch_num={L.micro_batch_num} is less than pipeline_stage={pp}: stages would idle",
                f"use micro_batch_num >= {pp} (recipes use 4-16x the stage count, e.g. {4 * pp})"))
    ga = exp.phase.gradient_accumulation_steps
    if exp.phase.trains and ga > 1 and pp == 1 and not exp.hardware.supports.semi_auto_parallel:
        out.append(Problem(
            "phase", "phase.gradient_accumulation_steps",
            f"gradient_accumulation_steps={ga}: MindFormers accumulates only in semi-auto parallel mode, which "
            f"{exp.hardware.name} lacks; it would reset it to 1 and train on 1/{ga} of the global batch",
            f"put the samples in the batch instead (the same global batch): phase.batch_size="
            f"{exp.phase.batch_size * ga} phase.gradient_accumulation_steps=1"))
    if exp.data.seq_length > m.max_position_embedding:
        out.append(Problem("data", "data.seq_length",
                           f"seq_length={exp.data.seq_length} is above max_position_embedding="
                           f"{m.max_position_embedding} of model {m.name}",
                           f"use data.seq_length <= {m.max_position_embedding}"))
    if p.use_seq_parallel and mp > 1 and exp.data.seq_length % mp:
        out.append(Problem("data", "data.seq_length",
                           f"sequence parallel splits seq_length={exp.data.seq_length} over model_parallel={mp}",
                           f"use a seq_length divisible by {mp}"))
    return out


def check_memory(exp, L, est) -> list[Problem]:
    if est.fits:
        return []
    m = exp.model
    runtime = f" + process and weight loading {est.runtime_gb:.1f}" if est.runtime_gb else ""
    terms = (f"estimated {est.total_gb:.1f} GB per device (weights {est.weights_gb:.1f} + gradients "
             f"{est.gradients_gb:.1f} + optimizer {est.optimizer_gb:.1f} + activations {est.activations_gb:.1f}"
             f" + KV cache {est.kv_cache_gb:.1f}{runtime}) for model {m.name} on {L.name}"
             f"{f' (pipeline stage {est.stage})' if L.pipeline_stage > 1 else ''} is over the budget of "
             f"{est.budget_gb:.0f} GB of {exp.hardware.name} by more than the estimate's "
             f"{100 * est.uncertainty:.0f} % uncertainty")
    fixed = est.weights_gb + est.runtime_gb          # what no batch or seq_length changes
    if not exp.phase.trains and fixed * (1 - est.uncertainty) > est.budget_gb:
        return [Problem("hardware", "hardware.max_device_memory", terms,
                        f"the weights alone ({est.weights_gb:.1f} GB, {fixed:.1f} GB while they load) do not fit: "
                        "choose a smaller model, or an Ascend profile to plan it over more devices")]
    if not exp.phase.trains:
        fit = fitting_seq_length(exp, L)
        fix = ("the cache and the prefill grow with phase.batch_size x data.seq_length: lower them"
               + (f" (data.seq_length={fit} fits at batch {exp.phase.batch_size})" if fit else "")
               + ", or plan it for more devices")
        return [Problem("hardware", "hardware.max_device_memory", terms, fix)]
    return [Problem("hardware", "hardware.max_device_memory", terms, training_memory_fix(exp, L))]


def training_memory_fix(exp, L) -> str:
    """The knobs that lower this job's memory, leaving out those already turned."""
    p, ph = exp.parallel, exp.phase
    fixes = ["spread the model over more devices (a larger parallel.model_parallel / parallel.pipeline_stage)"]
    if ph.lora is not None:
        fixes[0] += (": LoRA's frozen weights are not sharded by the parallel optimizer, only by model or "
                     "pipeline parallel")
    elif L.data_parallel > 1 and not (p.enable_parallel_optimizer or p.optimizer_shard):
        fixes.append("turn on the parallel optimizer (parallel.enable_parallel_optimizer=true)")
    if not (ph.recompute.recompute or ph.recompute.select_recompute):
        fixes.append("recompute (phase.recompute.recompute=true)")
    fixes.append("or shorten data.seq_length")
    return ", ".join(fixes)


def fitting_seq_length(exp, L) -> int | None:
    """The longest power-of-two seq_length (from 256) at which a generation job fits, if any."""
    from dataclasses import replace
    best, s = None, 256
    while s < exp.data.seq_length:
        if estimate_memory(replace(exp, data=replace(exp.data, seq_length=s)), L).fits:
            best = s
        s *= 2
    return best


def check_files(exp, executes: bool) -> list[Problem]:
    out = []
    d = exp.data
    # benchmarks (eval.tasks) read their tasks' data, not the data group's
    reads_data = exp.phase.run_mode != "predict" and not (exp.phase.run_mode == "eval" and exp.eval.tasks)
    # a plan's data lives on the cluster: its path is taken as given (or passed to the launch script)
    if reads_data and d.format != "none" and (executes or d.input):
        if not d.input:
            out.append(Problem("data", "data.input", f"data={d.name} needs an input file",
                               "set data.input=/path/to/file"))
        elif executes and not Path(d.input).exists():
            out.append(Problem("data", "data.input", f"{d.input} does not exist",
                               "set data.input to an existing file (paths are relative to where you run)"))
    if reads_data and d.format == "none":
        out.append(Problem("data", "data", f"phase={exp.phase.name} trains but data=none",
                           "choose training data, e.g. data=alpaca data.input=alpaca_data.json"))
    ck = exp.phase.load_checkpoint
    # a plan's weights may exist only on the cluster: its node scripts check them before the workers start
    if ck and executes and not Path(ck).exists():
        out.append(Problem("phase", "phase.load_checkpoint", f"{ck} does not exist",
                           "point phase.load_checkpoint at a checkpoint file, a Hugging Face folder, a folder of "
                           "rank_* folders or the dir of an earlier run"))
    return out


def check_rank_table(exp, L) -> list[Problem]:
    if not exp.launch.rank_table:
        return []
    if exp.hardware.device_target != "Ascend":
        return [Problem("launch", "launch.rank_table", f"an HCCL rank table with hardware={exp.hardware.name}",
                        "rank tables are for Ascend servers; leave launch.rank_table empty (msrun) on CPU")]
    from qwen15_exp.launch.rank_table import count_lie, read_table, table_problems
    try:
        servers, declared = read_table(exp.launch.rank_table)
    except UserError as e:
        return [Problem("launch", "launch.rank_table", str(e), "give the job's hccl.json")]
    issues = [count_lie(exp.launch.rank_table, declared, len(servers))] if declared != str(len(servers)) else []
    issues += table_problems(servers, L) if L is not None else []
    return [Problem("launch", "launch.rank_table", issue,
                    "use the table of this job's servers, or change parallel.* / parallel.nodes to match it")
            for issue in issues]


def check_tokenizer(exp, executes: bool) -> list[Problem]:
    from qwen15_exp.data.tokenizer import tokenizer_files
    needs_tokenizer = exp.data.format in ("alpaca", "chatml", "wiki") or exp.phase.run_mode == "predict"
    if not (executes and needs_tokenizer):
        return []
    try:
        tokenizer_files(exp.data.tokenizer_dir or None)
    except UserError as e:
        return [Problem("data", "data.tokenizer_dir", str(e).split(";")[0],
                        "set data.tokenizer_dir to a folder with vocab.json and merges.txt, or leave it empty "
                        "for the shipped Qwen tokenizer")]
    return []


MEMORY_SIZE = re.compile(r"\s*\d+(\.\d+)?\s*(GB|G|MB|TB)?\s*", re.IGNORECASE)


def check_formats(exp) -> list[Problem]:
    """Strings that go into launch scripts or are parsed: environment names, memory sizes, addresses."""
    out = []
    for key in exp.hardware.env:
        if not ENV_KEY.fullmatch(str(key)):
            out.append(Problem("hardware", "hardware.env", f"{key!r} is not an environment variable name",
                               "use letters, digits and underscores, not starting with a digit (e.g. HCCL_BUFFSIZE)"))
    if exp.hardware.max_device_memory and not MEMORY_SIZE.fullmatch(exp.hardware.max_device_memory):
        out.append(Problem("hardware", "hardware.max_device_memory",
                           f"{exp.hardware.max_device_memory!r} is not a memory size",
                           "write it as MindSpore does, e.g. 58GB"))
    if not (0 < exp.launch.master_port < 65536):
        out.append(Problem("launch", "launch.master_port", f"{exp.launch.master_port} is not a TCP port",
                           "use a port between 1024 and 65535, e.g. 8118"))
    return out


def validate(exp, layout=None, memory=None, executes: bool | None = None) -> list[Problem]:
    """Every problem of the experiment. A run hands in its layout, memory estimate and whether it executes
    here (computed once); alone, they are computed here."""
    problems = check_numbers(exp) + check_phase_inputs(exp) + check_formats(exp) + check_launch_values(exp)
    sane = not problems
    L = layout or laid_out(exp)       # None where the numbers make no layout (a zero degree)
    if executes is None:
        from qwen15_exp.launch.choose import choose_launcher
        executes = choose_launcher(exp, L).executes if L is not None else False
    if L is not None:                 # every layout problem too, even beside bad values (all at once)
        problems += layout_problems(exp, L)
    if sane and not problems:
        problems += check_memory(exp, L, memory or estimate_memory(exp, L))
    if exp.launch.k8s.enabled and L is not None:
        from qwen15_exp.launch.k8s import k8s_problems
        problems += [Problem("launch", "launch.k8s", p, "fix the launch.k8s.* keys or the layout")
                     for p in k8s_problems(exp, L)]
    problems += check_files(exp, executes)
    problems += check_benchmark(exp, L)
    problems += check_rank_table(exp, L)
    problems += check_tokenizer(exp, executes)
    return problems


def laid_out(exp):
    """The layout, or None when the values cannot make one (validate reports those values)."""
    try:
        return layout_of(exp)
    except (ArithmeticError, ValueError, UserError):
        return None


def layout_problems(exp, L) -> list[Problem]:
    out = []
    if L.nodes > exp.launch.max_nodes:      # before anything else: 10^6 devices would write 10^5 scripts
        return [Problem("parallel", "parallel", f"{L.devices:,} devices = {L.nodes:,} nodes ({L.terms}), more than "
                        f"launch.max_nodes={exp.launch.max_nodes}",
                        "check the degrees (parallel.data_parallel x model_parallel x pipeline_stage), or raise "
                        "launch.max_nodes for a cluster that large")]
    for check in (check_devices, check_model_vs_parallel):
        try:
            out += check(exp, L)
        except (ArithmeticError, ValueError):      # a value reported elsewhere made this check meaningless
            pass
    out += check_lora_targets(exp)
    if exp.phase.export and L.devices > 1:
        out.append(Problem("parallel", "parallel", f"phase=export on {L.devices} devices ({L.terms})",
                           "export on one device (parallel=single); qwen15_exp does not write sharded MindIR "
                           "(the seed's multi-card export needs MindFormers' distributed predict network)"))
    return out


def format_problems(problems: list[Problem]) -> str:
    head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found; nothing was run:"
    return "\n".join([head] + [f"  {i}. {p}" for i, p in enumerate(problems, 1)])


class InvalidExperiment(UserError):
    """The experiment has problems; nothing was run. The message lists them all."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__(format_problems(problems))
