"""The CPU optimizer (AdamW through MindSpore's fused AdamWeightDecay kernel) updates exactly as MindFormers'
AdamW and PyTorch's AdamW do: bias-corrected moments, decoupled weight decay, per-group decay and lr."""
import numpy as np
import pytest

pytestmark = pytest.mark.slow          # MindSpore kernels run in this process

BETAS, EPS, LR, WD, STEPS = (0.9, 0.95), 1e-8, 1e-2, 0.1, 6


def _shapes_and_grads():
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=(32,)).astype(np.float32)]
    grads = [[rng.normal(size=w.shape).astype(np.float32) for w in weights] for _ in range(STEPS)]
    return weights, grads


def _mindspore_run(optimizer_class, grouping: str):
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    weights, grads = _shapes_and_grads()
    params = [Parameter(Tensor(w.copy()), name=f"w{i}") for i, w in enumerate(weights)]
    lr = nn.WarmUpLR(LR, 3) if grouping == "schedule" else LR
    groups = {"none": params, "schedule": params,
              "decay": [{"params": [params[0]], "weight_decay": WD}, {"params": [params[1]], "weight_decay": 0.0}],
              "lr": [{"params": [params[0]], "lr": LR / 2}, {"params": [params[1]]}]}[grouping]
    opt = optimizer_class(groups, learning_rate=lr, betas=BETAS, eps=EPS, weight_decay=WD)
    for step_grads in grads:
        opt(tuple(Tensor(g) for g in step_grads))
    return ([p.asnumpy() for p in params], [m.asnumpy() for m in opt.exp_avg + opt.exp_avg_sq],
            [m.name for m in opt.exp_avg + opt.exp_avg_sq])


@pytest.mark.parametrize("grouping", ["none", "decay", "lr", "schedule"])
def test_cpu_adamw_updates_as_mindformers_adamw(grouping):
    from mindformers.core.optim.adamw import AdamW
    from qwen15_exp.mindformers_ext import CPUAdamW
    w_ours, state_ours, names_ours = _mindspore_run(CPUAdamW, grouping)
    w_theirs, state_theirs, names_theirs = _mindspore_run(AdamW, grouping)
    assert names_ours == names_theirs == ["adam_m.w0", "adam_m.w1", "adam_v.w0", "adam_v.w1"]  # resumable
    weight_diff = max(float(np.abs(a - b).max()) for a, b in zip(w_ours, w_theirs))
    state_diff = max(float(np.abs(a - b).max()) for a, b in zip(state_ours, state_theirs))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(w_ours, _shapes_and_grads()[0]))
    print(f"CHECK CPUAdamW vs MindFormers AdamW ({grouping}): weights {weight_diff:.2e}, moments {state_diff:.2e}, "
          f"after moving the weights by up to {moved:.2e}")
    assert moved > 3 * LR                       # it did train (about LR a step)
    assert weight_diff <= 2e-6 and state_diff <= 1e-6


def test_cpu_adamw_updates_as_pytorch_adamw():
    torch = pytest.importorskip("torch")
    from qwen15_exp.mindformers_ext import CPUAdamW
    weights, grads = _shapes_and_grads()
    params = [torch.nn.Parameter(torch.tensor(w.copy())) for w in weights]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
    ours = _mindspore_run(CPUAdamW, "none")[0]
    diff = max(float(np.abs(p.detach().numpy() - w).max()) for p, w in zip(params, ours))
    print(f"CHECK CPUAdamW vs torch.optim.AdamW: weights {diff:.2e}")
    assert diff <= 2e-6


def test_cpu_train_step_clips_by_the_global_norm_and_skips_a_step_with_a_nan():
    """The CPU train step's dot-product norm is the gradient's global norm, and a non-finite gradient is an
    overflow: that step leaves the weights as they were (MindFormers' IsFinite check did the same)."""
    import mindspore as ms
    from mindspore import Tensor, nn
    from qwen15_exp.mindformers_ext import CPUAdamW, CPUTrainOneStepCell
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

    class SquareLoss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.dense = nn.Dense(8, 4, has_bias=False)

        def construct(self, x):
            return (self.dense(x) ** 2).mean()

    net = SquareLoss()
    w0 = net.dense.weight.asnumpy().copy()
    step = CPUTrainOneStepCell(net, CPUAdamW(net.trainable_params(), learning_rate=LR), use_clip_grad=True,
                               max_grad_norm=1.0, scale_sense=1.0)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32) * 10
    y = x @ w0.T
    expected_norm = np.linalg.norm((2 * y / y.size).T @ x)
    _, overflow, _, _, norm = step(Tensor(x))
    w1 = net.dense.weight.asnumpy().copy()
    print(f"CHECK CPU train step: global norm {float(norm.asnumpy()[0]):.5f} vs numpy {expected_norm:.5f}")
    assert not bool(overflow.asnumpy()) and float(norm.asnumpy()[0]) == pytest.approx(expected_norm, rel=1e-5)
    assert np.abs(w1 - w0).max() == pytest.approx(LR, rel=1e-3)        # Adam's first step moves each weight by lr
    x[0, 0] = np.nan
    _, overflow, *_ = step(Tensor(x))
    assert bool(overflow.asnumpy()) and np.array_equal(net.dense.weight.asnumpy(), w1)
