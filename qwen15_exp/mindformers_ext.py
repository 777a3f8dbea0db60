"""The two small pieces qwen15_exp adds to MindFormers. Importing this module registers them.

- CPUTrainOneStepCell: MFTrainOneStepCell whose overflow check works on CPU. MindSpore's
  TrainOneStepWithLossScaleCell.get_overflow_status knows GPU and Ascend 910B only; every other device falls
  into the 910A branch and emits NPUGetFloatStatusV2, which has no CPU kernel. The infnan-mode helper uses
  IsFinite instead. A written mindformers.yaml for hardware=cpu names this wrapper, so whoever runs that
  YAML with MindFormers alone imports this module first (run_mindformer.py: --register_path).
- StepRecorder: a MindSpore callback that records loss and wall time of every step for result.json
  (MFLossMonitor prints them but does not keep them).
"""
from __future__ import annotations

import time

import numpy as np
from mindspore.nn.wrap.loss_scale import _ascend_grad_overflow
from mindspore.train.callback import Callback
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper.wrapper import MFTrainOneStepCell


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class CPUTrainOneStepCell(MFTrainOneStepCell):
    """MFTrainOneStepCell with an overflow check that has a CPU kernel (IsFinite)."""

    def get_overflow_status(self, status, compute_output):
        return self._get_distributed_overflow_status_on_infnan_mode(_ascend_grad_overflow, compute_output)


def _loss_of(outputs) -> float:
    first = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return float(np.asarray(first.asnumpy() if hasattr(first, "asnumpy") else first).reshape(-1)[0])


class StepRecorder(Callback):
    """Loss and end time of every training step (time.perf_counter, seconds)."""

    def __init__(self):
        super().__init__()
        self.t_begin = None
        self.step_end_times: list[float] = []
        self.step_end_unix: list[float] = []
        self.losses: list[float] = []

    def on_train_begin(self, run_context):
        self.t_begin = time.perf_counter()

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        self.step_end_times.append(time.perf_counter())
        self.step_end_unix.append(time.time())
        self.losses.append(_loss_of(cb.net_outputs))

    def step_times(self) -> list[float]:
        if not self.step_end_times:
            return []
        starts = [self.t_begin] + self.step_end_times[:-1]
        return [round(e - s, 6) for s, e in zip(starts, self.step_end_times)]
