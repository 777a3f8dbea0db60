"""Build the MindFormers network of a config without allocating its weights (any size, seconds).

`mindspore.nn.utils.no_init_parameters` defers parameter initialisation, so even 72B builds on a laptop
and gives the exact parameter names, shapes and count MindFormers will train.
"""
from __future__ import annotations


def build_lazily(model_config: dict):
    """LlamaForCausalLM from a MindFormers model_config dict (as mindformers.yaml holds it), uninitialised."""
    import mindspore as ms
    from mindspore.nn.utils import no_init_parameters
    from mindformers import LlamaConfig, LlamaForCausalLM

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    kwargs = {k: v for k, v in model_config.items() if k != "type"}
    kwargs.update(use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True, use_past=False)
    config = LlamaConfig(**kwargs)
    with no_init_parameters():
        return LlamaForCausalLM(config=config)


def parameter_table(network) -> list[tuple[str, tuple]]:
    return [(p.name, tuple(p.shape)) for p in network.get_parameters()]


def parameter_count(network) -> int:
    import numpy as np
    return int(sum(np.prod(shape) for _, shape in parameter_table(network)))
