"""Text generation with MindFormers' own LlamaForCausalLM.generate, on the model a mindformers.yaml describes.

On CPU two MindFormers defaults need help (both from the field notes): greedy decoding calls mint.argmax,
whose ArgMaxExt kernel is Ascend-only, so `use_cpu_argmax` gives MindFormers' text generator ops.Argmax,
for this process (the in-process generator and the msrun worker's Trainer.predict alike); and sampling runs
its logits processors in numpy (`postprocess_use_numpy`, set in the CPU config). The KV cache is Ascend-only
too: the CPU config has use_past false, so each new token recomputes the sequence.
"""
from __future__ import annotations

import time

from qwen15_exp.errors import UserError


def use_cpu_argmax() -> None:
    """MindFormers' text generator calls mint.argmax (ArgMaxExt, Ascend-only): give it ops.Argmax on CPU.

    GenerationMixin binds `self.argmax = mint.argmax` from the text generator's module namespace when a model
    is built, so this runs before the model is built."""
    import mindspore as ms
    import mindformers.generation.text_generator as text_generator

    if getattr(text_generator.mint, "is_cpu_argmax", False):
        return

    class CpuMint:
        is_cpu_argmax = True
        _argmax = ms.ops.Argmax(axis=-1, output_type=ms.int32)

        def __getattr__(self, name):
            return getattr(ms.mint, name)

        def argmax(self, x, dim=-1, keepdim=False):
            return self._argmax(x)

    text_generator.mint = CpuMint()


def load_params(network, checkpoint: str) -> None:
    import mindspore as ms
    fmt = "safetensors" if checkpoint.endswith(".safetensors") else "ckpt"
    params = ms.load_checkpoint(checkpoint, format=fmt)
    missing, _ = ms.load_param_into_net(network, params, strict_load=False)
    missing = [m for m in missing if not m.startswith(("adam_", "global_step"))]
    if missing:
        raise UserError(f"{checkpoint} does not fit model: {len(missing)} parameters missing, e.g. {missing[:3]}; "
                        "choose the model=<size> the weights belong to")


def generation_kwargs(exp, seed: int | None = None) -> dict:
    """MindFormers generate() settings from phase.generation (greedy or sampling, eos ids). In the chat
    template generation also ends where a reply ends (<|im_end|> or a new <|im_start|>), so what is generated
    is what is shown."""
    from qwen15_exp.data.chatml import STOP_IDS
    g = exp.phase.generation
    eos = list(g.eos_token_id)
    if exp.phase.chat:
        eos += [t for t in STOP_IDS if t not in eos]
    kwargs = {"do_sample": g.do_sample, "top_k": g.top_k, "top_p": g.top_p,
              "repetition_penalty": g.repetition_penalty, "eos_token_id": eos}
    if g.temperature is not None:
        kwargs["temperature"] = g.temperature
    if seed is not None:
        kwargs["seed"] = seed
    return kwargs


class Streamer:
    """MindFormers streamer protocol: the prompt first, then one token per step."""

    def __init__(self, on_token):
        self.on_token, self.seen_prompt = on_token, False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_token(int(value[0] if hasattr(value, "__len__") else value))

    def end(self):
        pass


class Generator:
    def __init__(self, mf_config: dict, checkpoint: str = "", quiet: bool = False):
        from mindformers import LlamaConfig, LlamaForCausalLM
        from mindformers.core.context import build_context
        if quiet:                          # MindFormers logs every generate() call to stdout
            import logging
            for name, log in list(logging.root.manager.loggerDict.items()):
                if "mindformers" in name and isinstance(log, logging.Logger):
                    log.setLevel(logging.WARNING)

        build_context({"context": mf_config["context"], "parallel": {"parallel_mode": 0}, "use_parallel": False,
                       "postprocess_use_numpy": mf_config.get("postprocess_use_numpy", False)})
        if mf_config["context"].get("device_target") == "CPU":
            use_cpu_argmax()
        mc = {k: v for k, v in mf_config["model"]["model_config"].items() if k != "type"}
        self.seq_length = mc["seq_length"]
        self.model = LlamaForCausalLM(LlamaConfig(**mc, checkpoint_name_or_path=""))
        self.model.set_train(False)
        self.checkpoint = checkpoint
        if checkpoint:
            load_params(self.model, checkpoint)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_token=None, **kwargs) -> tuple[list[int], float]:
        """(new token ids, seconds). Generation stops at the configured eos ids or max_new_tokens."""
        room = self.seq_length - len(prompt_ids)
        if room < 1:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens and seq_length is {self.seq_length}; "
                            "shorten it (or clear the history) or raise data.seq_length")
        t0 = time.perf_counter()
        out = self.model.generate([prompt_ids], max_new_tokens=min(max_new_tokens, room),
                                  streamer=Streamer(on_token) if on_token else None, **kwargs)
        return [int(x) for x in out[0][len(prompt_ids):]], time.perf_counter() - t0
