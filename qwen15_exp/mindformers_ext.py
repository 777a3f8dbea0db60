"""The small pieces qwen15_exp adds to MindFormers. Importing this module registers them.

- CPUTrainOneStepCell: MFTrainOneStepCell whose overflow check works on CPU, and quickly. MindSpore's
  TrainOneStepWithLossScaleCell.get_overflow_status knows GPU and Ascend 910B only; every other device falls
  into the 910A branch and emits NPUGetFloatStatusV2, which has no CPU kernel. The infnan-mode helper works
  (IsFinite, ReduceAll per gradient) but MindSpore's CPU ReduceAll and whole-tensor ReduceSum run on one
  thread: on the tiny model the check (35 ms) and the clipping norm (48 ms) were 40 % of a step. Here both
  take each gradient's sum of squares as a dot product (one multi-threaded MatMul, 2 ms for the embedding),
  and a step overflows when that sum is not finite: an inf or nan anywhere, or a norm past fp32's range,
  which the original would have clipped to a zero update. A written mindformers.yaml for hardware=cpu names
  this wrapper, so whoever runs that YAML with MindFormers alone imports this module first
  (run_mindformer.py: --register_path).
- CPULlamaForCausalLM: LlamaForCausalLM whose training loss is one LogSoftmax kernel and a gather. MindFormers'
  CrossEntropyLoss is written for sharded vocabularies (ReduceMax, Sub, Exp, ReduceSum, Log, OneHot, Mul, each
  a kernel of its own); on the CPU, where no layout shards it, it took a third of the tiny model's step
  (fwd+bwd over 128 x 151,936 logits: 366 ms alone, against 53 ms for this one, same value).
- CPUAdamW: MindFormers' AdamW (bias-corrected, decoupled weight decay, the same state names) computed by
  MindSpore's fused AdamWeightDecay kernel, which has a CPU kernel; MindFormers' AdamW is ten element-wise
  kernels per parameter there, and its fused AdamW op has none ("Unsupported op [AdamW] on CPU"). The bias
  corrections fold into the kernel's scalars (see CPUAdamW.construct), so the update is AdamW's exactly.
- StepRecorder: a MindSpore callback that records loss and wall time of every step (MFLossMonitor prints them
  but does not keep them) and appends each step to a JSON-lines log as it happens, so a killed run keeps
  its curve. Steps are numbered as in an uninterrupted run: after MindFormers' resume, cur_step_num starts
  again at 1, and the plan exports the steps already done (QWEN15_EXP_INITIAL_STEP).
- skip_checkpoint_preload: data-parallel runs on CPU load a .ckpt (resume) only without MindFormers' MindIO
  preload step, which is an Ascend-cluster feature and ends in a barrier() that has no CPU kernel.
- TokenPerplexity: MindFormers' PerplexityMetric weighted by tokens. The original averages the batches' mean
  losses, which is exp(mean token NLL) only when every batch holds as many tokens; padded chat rows do not.
  Each evaluation is appended to <run>/eval_rank<r>.jsonl with the training step it followed.
- StopControl: a graceful stop. A stop request (SIGINT/SIGTERM, see lifecycle.py) ends training at a step
  boundary through run_context.request_stop(), after which MindFormers' CheckpointMonitor saves a final
  checkpoint. Data-parallel ranks agree on the step through a file in the run dir, so none is left waiting
  in a collective.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore.train.callback import Callback
from mindspore import nn, ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P
from mindformers.core.clip_grad import ClipGradNorm, apply_global_norm
from mindformers.core.metric.metric import PerplexityMetric
from mindformers.core.optim.adamw import AdamW as MindFormersAdamW
from mindformers.models.llama.llama import LlamaForCausalLM
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper.wrapper import MFTrainOneStepCell

from qwen15_exp.lifecycle import INITIAL_STEP_ENV, STOP_FILE


_square_sum_by_dot = C.MultitypeFuncGraph("square_sum_by_dot")
_dot = P.MatMul(transpose_b=True)


@_square_sum_by_dot.register("Tensor")
def _square_sum_of(x):
    """sum(x * x) as a (1,) tensor, like MindFormers' get_square_sum, by one multi-threaded MatMul."""
    flat = P.Reshape()(P.Cast()(x, ms.float32), (1, -1))
    return P.Reshape()(_dot(flat, flat), (1,))


def _gradients_square_sum(hyper_map, grads):
    """sum of every gradient's squares: the clipping norm's and the overflow check's (the graph compiler's
    common-subexpression pass computes it once for both)."""
    return F.addn(hyper_map(_square_sum_by_dot, grads))


class CPUClipGradNorm(ClipGradNorm):
    """MindFormers' ClipGradNorm with the squared norms taken as dot products (see the module's docstring)."""

    def construct(self, x):
        global_norm = F.sqrt(_gradients_square_sum(self.hyper_map, x))
        global_norm_clip = F.select(self.greater_equal(global_norm, self.clip_norm), global_norm, self.clip_norm)
        return self.hyper_map(F.partial(apply_global_norm, self.clip_norm, global_norm_clip), x), global_norm


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class CPUTrainOneStepCell(MFTrainOneStepCell):
    """MFTrainOneStepCell whose overflow check and gradient clipping have fast CPU kernels."""

    def __init__(self, network, optimizer, use_clip_grad=False, max_grad_norm=1.0, **kwargs):
        super().__init__(network, optimizer, use_clip_grad=use_clip_grad, max_grad_norm=max_grad_norm, **kwargs)
        self.clip_grad_norm = CPUClipGradNorm(max_norm=max_grad_norm)
        self.is_finite = P.IsFinite()

    def get_overflow_status(self, status, compute_output):
        square_sum = _gradients_square_sum(self.hyper_map, compute_output)
        flag = F.cast(F.logical_not(self.is_finite(square_sum)), ms.float32)
        if self.is_distributed:
            flag = self.allreduce(flag)
        return self.less_equal(self.base, P.Reshape()(flag, ()))


class LogSoftmaxCrossEntropy(nn.Cell):
    """MindFormers' CrossEntropyLoss contract (logits (N, V), labels (N,), mask (N,) -> masked mean, or
    numerator and denominator for per-token loss), computed by one LogSoftmax kernel. Primitives, not
    functional ops: a data-parallel graph on CPU rejects the sub-graphs those become. Masked labels may be
    the ignore index (-100): they are gathered from column 0 (and masked), never from outside the row."""

    def __init__(self, calculate_per_token_loss: bool = False):
        super().__init__()
        self.log_softmax = P.LogSoftmax(axis=-1)
        self.gather = P.GatherD()
        self.maximum = P.Maximum()
        self.reshape = P.Reshape()
        self.cast = P.Cast()
        self.sum = P.ReduceSum()
        self.mul = P.Mul()
        self.div = P.RealDiv()
        self.neg = P.Neg()
        self.per_token = calculate_per_token_loss

    def construct(self, logits, label, input_mask):
        log_probs = self.log_softmax(self.cast(logits, ms.float32))
        index = self.reshape(self.maximum(self.cast(label, ms.int32), 0), (-1, 1))
        nll = self.reshape(self.neg(self.gather(log_probs, 1, index)), (-1,))
        mask = self.reshape(self.cast(input_mask, ms.float32), (-1,))
        numerator = self.sum(self.mul(nll, mask))
        denominator = self.sum(mask) + 1e-8
        if self.per_token:
            return numerator, denominator
        return self.div(numerator, denominator)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class CPULlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM for the CPU: the loss above for training, and with use_past the KV-cache attention of
    qwen15_exp.kv_cache_cpu for generation (decode steps read only the cache blocks in use)."""

    def __init__(self, config=None):
        from qwen15_exp.kv_cache_cpu import cpu_generation_cells
        with cpu_generation_cells() if getattr(config, "use_past", False) else contextlib.nullcontext():
            super().__init__(config=config)      # by keyword: MindFormers' lazy_inline reads `disable_lazy_inline` there
        self.loss = LogSoftmaxCrossEntropy(getattr(self.config, "calculate_per_token_loss", False))
        if self.use_past:
            # MindFormers' generate learns PyNative from the ENFORCE_EAGER environment variable, not the context
            self.is_pynative = ms.get_context("mode") == ms.PYNATIVE_MODE

    def pre_gather_func(self, pre_gather, output, batch_valid_length, gather_index=None):
        """The prefill's hidden state at each sequence's last prompt position ([B, 1, H]), so lm_head runs on B
        rows (the prompts come as [B, longest], see below; MindFormers' is_dynamic branch expects them flattened)."""
        if not (self.use_past and pre_gather):
            return super().pre_gather_func(pre_gather, output, batch_valid_length, gather_index)
        last = (batch_valid_length - 1).reshape(-1, 1, 1).astype(ms.int32)
        return ops.gather_elements(output, 1, ops.tile(last, (1, 1, self.config.hidden_size)))

    def _incremental_infer(self, model_inputs, prefill, current_index, key_cache=None, value_cache=None,
                           need_flatten=False):
        """The prefill kernel by kernel (PyNative), the decode steps as MindFormers' compiled graph. A
        dynamic-shape graph on the CPU keeps every intermediate tensor of the pass until it ends: a 0.5B
        prefill of 8 x 460 tokens passed 24 GB that way, and PyNative frees each as it goes (and needs no compile)."""
        if not (self.use_past and prefill and os.environ.get("QWEN15_EXP_GRAPH_PREFILL") != "1"):
            return super()._incremental_infer(model_inputs, prefill, current_index, key_cache, value_cache,
                                              need_flatten)
        graph = ms.get_context("mode")
        ms.set_context(mode=ms.PYNATIVE_MODE)
        self.add_flags_custom(is_first_iteration=True)
        try:
            return super()._incremental_infer(model_inputs, prefill, current_index, key_cache, value_cache,
                                              need_flatten)
        finally:
            ms.set_context(mode=graph)
            self.add_flags_custom(is_first_iteration=False)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """With the KV cache: the prefill takes the prompts right-padded to the longest of the batch only (not to
        seq_length, and not flattened), and a decode step the block-table columns in use."""
        if not self.use_past:
            return super().prepare_inputs_for_generation(input_ids, **kwargs)
        valid = np.asarray(kwargs["valid_length_each_example"])
        if kwargs.get("prefill"):
            width = int(valid.max())
            slots = np.asarray(kwargs["slot_mapping"]).reshape(len(valid), -1)[:, :width]
            return {"input_ids": ms.Tensor.from_numpy(np.ascontiguousarray(input_ids[:, :width], dtype=np.int32)),
                    "slot_mapping": ms.Tensor.from_numpy(np.ascontiguousarray(slots.reshape(-1), dtype=np.int32))}
        from qwen15_exp.kv_cache_cpu import trimmed_block_tables
        return {"input_ids": ms.Tensor.from_numpy(input_ids.astype(np.int32)),
                "block_tables": ms.Tensor.from_numpy(
                    trimmed_block_tables(kwargs["block_tables"], valid, self.config.block_size))}


_fused_adamw = C.MultitypeFuncGraph("fused_adamw")


@_fused_adamw.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor", "Tensor", "Tensor", "Bool")
def _fused_adamw_step(kernel, beta1, beta2, eps_t, decay_scale, lr_scale, lr, weight_decay, param, grad, exp_avg,
                      exp_avg_sq, optim_filter):
    if optim_filter:
        kernel(param, exp_avg, exp_avg_sq, lr * lr_scale, beta1, beta2, eps_t, weight_decay * decay_scale,
               P.Cast()(grad, F.dtype(param)))
    return True


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
class CPUAdamW(MindFormersAdamW):
    """MindFormers' AdamW through the fused AdamWeightDecay kernel (one pass over each parameter on CPU).

    The kernel computes m and v as AdamW does, then w -= lr' * (m / (sqrt(v) + eps') + decay' * w), with no bias
    correction. With c1 = 1 - beta1^t and c2 = 1 - beta2^t, lr' = lr * sqrt(c2) / c1, eps' = eps * sqrt(c2) and
    decay' = weight_decay * c1 / sqrt(c2) make that exactly AdamW's
    w * (1 - lr * weight_decay) - lr / c1 * m / (sqrt(v / c2) + eps)."""

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, swap=False,
                 use_fused=False, amsgrad=False, maximize=False):
        if amsgrad or maximize:             # use_fused: this is the fused one
            raise ValueError("CPUAdamW computes AdamW's plain update; amsgrad and maximize need MindFormers' "
                             "fused AdamW (optimizer.use_fused, Ascend only)")
        super().__init__(params, learning_rate=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay,
                         swap=swap)
        self.kernel = P.AdamWeightDecay()
        self.pow, self.sqrt = P.Pow(), P.Sqrt()

    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        step = F.cast(self.global_step, ms.float32)
        c1 = 1.0 - self.pow(self.beta1, step)
        sqrt_c2 = self.sqrt(1.0 - self.pow(self.beta2, step))
        eps_t, decay_scale, lr_scale = self.eps * sqrt_c2, c1 / sqrt_c2, sqrt_c2 / c1
        if self.is_group:
            if self.is_group_lr:
                return self.hyper_map(F.partial(_fused_adamw, self.kernel, self.beta1, self.beta2, eps_t,
                                                decay_scale, lr_scale),
                                      lr, weight_decay, self._parameters, gradients, self.exp_avg, self.exp_avg_sq,
                                      self.optim_filter)
            return self.hyper_map(F.partial(_fused_adamw, self.kernel, self.beta1, self.beta2, eps_t, decay_scale,
                                            lr_scale, lr),
                                  weight_decay, self._parameters, gradients, self.exp_avg, self.exp_avg_sq,
                                  self.optim_filter)
        return self.hyper_map(F.partial(_fused_adamw, self.kernel, self.beta1, self.beta2, eps_t, decay_scale,
                                        lr_scale, lr, weight_decay),
                              self._parameters, gradients, self.exp_avg, self.exp_avg_sq, self.optim_filter)


def skip_checkpoint_preload() -> None:
    """Replace MindFormers' MindIO checkpoint preload (nothing to preload without MindIO) on CPU."""
    import mindformers.trainer.base_trainer as base_trainer
    base_trainer.preload_ckpt = lambda config: None


def _loss_of(outputs) -> float:
    first = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return float(np.asarray(first.asnumpy() if hasattr(first, "asnumpy") else first).reshape(-1)[0])


def absolute_step(cb_params) -> int:
    """The training step as an uninterrupted run numbers it. MindFormers' resume restarts cur_step_num at 1
    (its own loss monitor is told the initial step when built); the plan of a resumed run exports it."""
    return int(cb_params.cur_step_num) + int(os.environ.get(INITIAL_STEP_ENV, "0") or 0)


LAST_STEP = [0]             # the newest training step this process finished (0: none, e.g. phase=eval)


@MindFormerRegister.register(MindFormerModuleType.METRIC)
class TokenPerplexity(PerplexityMetric):
    """Perplexity = exp(total NLL / scored tokens); each evaluation appended to `log_dir`/eval_rank<r>.jsonl."""

    def __init__(self, log_dir: str = ""):
        super().__init__()
        self.log_dir = log_dir
        self.nll, self.tokens = 0.0, 0

    def clear(self):
        super().clear()
        self.nll, self.tokens = 0.0, 0

    def update(self, *inputs):
        if self.pipeline_parallel:           # only the last stage has logits; MindFormers' own handling
            return super().update(*inputs)
        loss = float(self.ppl_loss(*inputs).asnumpy())
        scored = int(round(float(inputs[2].asnumpy()[:, 1:].sum())))   # PerplexityCell scores tokens 1..n
        self.total_loss += loss
        self.num_data += 1
        self.nll += loss * scored
        self.tokens += scored
        return None

    def eval(self):
        out = super().eval()
        if out is None or not self.tokens:
            return out
        mean = self.nll / self.tokens
        out = {"loss": mean, "PPL": float(np.exp(mean)), "tokens": self.tokens, "batches": self.num_data,
               "batch_mean_loss": out["loss"]}
        if self.log_dir:
            from mindformers.tools.utils import get_real_rank
            with open(Path(self.log_dir) / f"eval_rank{get_real_rank()}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": LAST_STEP[0], **out, "unix": round(time.time(), 3)}) + "\n")
        return out


class StepRecorder(Callback):
    """Loss and end time of every training step; each step also appended to `log_path` (JSON lines)."""

    def __init__(self, log_path: str | Path | None = None, progress=None):
        super().__init__()
        self.progress = progress                 # a console.Progress, shown on the terminal
        self.t_begin = None
        self.step_end_times: list[float] = []
        self.step_end_unix: list[float] = []
        self.losses: list[float] = []
        self.steps: list[int] = []
        self.log_path = Path(log_path) if log_path else None

    def on_train_begin(self, run_context):
        self.t_begin = time.perf_counter()

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        now = time.perf_counter()
        step_s = now - (self.step_end_times[-1] if self.step_end_times else self.t_begin)
        self.step_end_times.append(now)
        self.step_end_unix.append(time.time())
        self.losses.append(_loss_of(cb.net_outputs))
        self.steps.append(absolute_step(cb))
        LAST_STEP[0] = self.steps[-1]
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.steps[-1], "loss": self.losses[-1], "step_s": round(step_s, 6),
                                    "unix": round(self.step_end_unix[-1], 3)}) + "\n")
        if self.progress is not None:
            self.progress.step(self.losses[-1], step_s)

    def step_times(self) -> list[float]:
        if not self.step_end_times:
            return []
        starts = [self.t_begin] + self.step_end_times[:-1]
        return [round(e - s, 6) for s, e in zip(starts, self.step_end_times)]


class StopControl(Callback):
    """Ends training at a step boundary once a stop is requested, at the same step on every rank.

    `requested()` says whether this process was asked to stop (a signal handler's flag). The first rank that
    sees a request writes STOP in the run dir with the step to stop at (its step + 1 when other ranks may be a
    step behind it); every rank stops when it reaches that step. The launcher may write STOP itself."""

    def __init__(self, run_dir: str | Path, requested, ranks: int = 1):
        super().__init__()
        self.stop_file = Path(run_dir) / STOP_FILE
        self.requested, self.ranks = requested, ranks
        self.stopped_at: int | None = None

    def on_train_begin(self, run_context):
        if hasattr(self.requested, "training"):     # from now on a first signal waits for a step boundary
            self.requested.training = True

    def _stop_step(self, step: int) -> int | None:
        if self.requested() and not self.stop_file.exists():
            target = step + (1 if self.ranks > 1 else 0)
            try:
                fd = os.open(self.stop_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(str(target))
            except FileExistsError:
                pass
        try:
            return int(self.stop_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def on_train_step_end(self, run_context):
        step = absolute_step(run_context.original_args())
        target = self._stop_step(step)
        if target is not None and step >= target:
            self.stopped_at = step
            run_context.request_stop()
