"""The CPU model's one-kernel loss computes MindFormers' CrossEntropyLoss (and its gradient)."""
import numpy as np
import pytest

pytestmark = pytest.mark.slow          # MindSpore kernels run in this process


@pytest.mark.parametrize("per_token", [False, True])
def test_the_log_softmax_loss_equals_mindformers_cross_entropy(per_token):
    import mindspore as ms
    from mindformers.core.loss.loss import CrossEntropyLoss

    from qwen15_exp.mindformers_ext import LogSoftmaxCrossEntropy
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(0)
    n, vocab = 24, 1000
    logits = ms.Tensor(rng.normal(0, 3, (n, vocab)).astype(np.float32))
    labels = rng.integers(0, vocab, n).astype(np.int32)
    labels[:7] = -100                                  # a masked prompt, as chat rows have: the ignore index
    mask = np.ones(n, np.float32)
    mask[:7] = 0
    labels, mask = ms.Tensor(labels), ms.Tensor(mask)
    theirs = CrossEntropyLoss(calculate_per_token_loss=per_token)
    ours = LogSoftmaxCrossEntropy(per_token)

    def value_and_grad(net):
        def scalar(x, y, m):
            out = net(x, y, m)
            return out[0] / out[1] if per_token else out
        value, grad = ms.value_and_grad(scalar, grad_position=0)(logits, labels, mask)
        return float(value.asnumpy()), grad.asnumpy(), net(logits, labels, mask)

    v_theirs, g_theirs, raw_theirs = value_and_grad(theirs)
    v_ours, g_ours, raw_ours = value_and_grad(ours)
    expected = np.asarray(logits.asnumpy(), np.float64)
    log_probs = expected - np.log(np.exp(expected - expected.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - expected.max(1, keepdims=True)
    m = mask.asnumpy()
    assert v_ours == pytest.approx(-(log_probs[np.arange(n), np.maximum(labels.asnumpy(), 0)] * m).sum() / m.sum(),
                                  rel=1e-5)
    assert v_ours == pytest.approx(v_theirs, rel=1e-6)
    assert np.abs(g_ours - g_theirs).max() < 1e-6
    if per_token:
        assert [float(x.asnumpy()) for x in raw_ours] == pytest.approx([float(x.asnumpy()) for x in raw_theirs],
                                                                       rel=1e-6)
