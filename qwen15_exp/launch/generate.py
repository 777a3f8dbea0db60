"""Text generation with MindFormers' own LlamaForCausalLM.generate, on the model a mindformers.yaml describes.

On CPU two MindFormers defaults need help (both from the field notes): greedy decoding calls mint.argmax,
whose ArgMaxExt kernel is Ascend-only, so `use_cpu_argmax` gives MindFormers' text generator ops.Argmax,
for this process (the in-process generator and the msrun worker's Trainer.predict alike); and sampling runs
its logits processors in numpy (`postprocess_use_numpy`, set in the CPU config). The KV cache's kernels are
Ascend-only too: on the CPU the network is CPULlamaForCausalLM, whose attention is qwen15_exp.kv_cache_cpu's.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

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
    # the KV cache is state, not weights: no checkpoint holds it
    missing = [m for m in missing if not m.startswith(("adam_", "global_step"))
               and not m.endswith((".key_cache", ".value_cache"))]
    if missing:
        raise UserError(f"{checkpoint} does not fit model: {len(missing)} parameters missing, e.g. {missing[:3]}; "
                        "choose the model=<size> the weights belong to")


def answer_tokens(g, prompt_tokens: int, seq_length: int) -> int:
    """The longest answer: generation.max_new_tokens when set, else what max_decode_length (MindFormers' cap on
    prompt + answer) leaves, as MindFormers' generate reads them; never past seq_length."""
    wanted = g.max_new_tokens if g.max_new_tokens is not None else g.max_decode_length - prompt_tokens
    return max(1, min(wanted, seq_length - prompt_tokens - 1))


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


def _not_mindformers(record) -> bool:
    return "/mindformers/" not in record.pathname


def quiet_mindformers_logs() -> None:
    """MindFormers' INFO lines off the terminal: its own loggers at WARNING, and the root logger's handlers
    (which Hydra points at the terminal) drop records from MindFormers' files, such as its cache engine's
    `logging.info("free block num in pool")` every generation."""
    import logging
    for name, log in list(logging.root.manager.loggerDict.items()):
        if "mindformers" in name and isinstance(log, logging.Logger):
            log.setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if _not_mindformers not in handler.filters:
            handler.addFilter(_not_mindformers)


class StopGeneration(Exception):
    """Raised from the streamer to end a batch early (MindFormers' generate has no stop-string criterion)."""


class Streamer:
    """MindFormers' streamer protocol: the prompt first, then each step's tokens (one per sequence). Times the
    first step (the prefill: time to first token) and hands batch 1's tokens to `on_token`. With `stop`, keeps
    every sequence's tokens and ends the batch once stop(tokens so far) says so."""

    def __init__(self, on_token=None, stop=None, batch: int = 1):
        self.on_token, self.seen_prompt = on_token, False
        self.t_prompt = self.t_first = None
        self.stop, self.tokens = stop, [[] for _ in range(batch)]

    def put(self, value):
        now = time.perf_counter()
        if not self.seen_prompt:
            self.seen_prompt, self.t_prompt = True, now
            return
        if self.t_first is None:
            self.t_first = now
        if self.on_token is not None:
            self.on_token(int(value[0] if hasattr(value, "__len__") else value))
        if self.stop is not None:
            for seq, token in zip(self.tokens, value if hasattr(value, "__len__") else [value]):
                seq.append(int(token))
            if self.stop(self.tokens):
                raise StopGeneration

    def end(self):
        pass

    @property
    def first_token_s(self) -> float | None:
        return self.t_first - self.t_prompt if self.t_first is not None else None


@dataclass
class Generated:
    """One batch's generation: each sequence's new token ids, the batch's wall time and time to first token."""
    new_ids: list
    seconds: float
    first_token_s: float | None
    logits: list | None = None          # per step, [batch, vocab] (return_logits=True; tests)


def start_context(mf_config: dict, quiet: bool = False) -> bool:
    """MindFormers' context for building networks in this process, and the CPU's help; True on the CPU."""
    from mindformers.core.context import build_context
    if quiet:                          # MindFormers logs every generate() call to stdout
        quiet_mindformers_logs()
    cpu = mf_config["context"].get("device_target") == "CPU"
    build_context({"context": mf_config["context"], "parallel": {"parallel_mode": 0}, "use_parallel": False,
                   "postprocess_use_numpy": mf_config.get("postprocess_use_numpy", False)})
    if cpu:
        use_cpu_argmax()
    if cpu and os.environ.get("QWEN15_EXP_ASYNC_KERNELS") != "1":
        # the prefill runs in PyNative (CPULlamaForCausalLM), which queues kernels for a worker thread and waits
        # for it at every .shape or .dtype read, as MindFormers' layers do per call (0.7 ms each on 2 cores):
        # run them in this thread instead
        import mindspore as ms
        ms.runtime.launch_blocking()
    return cpu


def build_network(model_class, model_config: dict, checkpoint: str = ""):
    """The network of a model_config (MindFormers' LlamaConfig keys) with the checkpoint's weights, for inference."""
    from mindformers import LlamaConfig
    if checkpoint:                       # no random initialisation of weights about to be loaded
        from mindspore.nn.utils import no_init_parameters
        with no_init_parameters():
            network = model_class(config=LlamaConfig(**model_config, checkpoint_name_or_path=""))
        load_params(network, checkpoint)
        network.init_parameters_data()            # what the checkpoint does not hold: the KV cache
    else:
        network = model_class(config=LlamaConfig(**model_config, checkpoint_name_or_path=""))
    network.set_train(False)
    return network


class Generator:
    """A MindFormers Llama network built from a mindformers.yaml's model section, with its weights, generating
    through MindFormers' own `generate`. On the CPU with use_past it is the CPU model class, whose attention
    is qwen15_exp.kv_cache_cpu's."""

    def __init__(self, mf_config: dict, checkpoint: str = "", quiet: bool = False):
        from mindformers import LlamaForCausalLM
        cpu = start_context(mf_config, quiet)
        mc = {k: v for k, v in mf_config["model"]["model_config"].items() if k not in ("type", "max_new_tokens")}
        self.seq_length = mc["seq_length"]
        self.batch_size = mc.get("batch_size", 1)         # the KV cache holds this many sequences
        self.pad_token_id = mc.get("pad_token_id", 0)
        model_class = LlamaForCausalLM
        if cpu and mc.get("use_past"):
            from qwen15_exp.mindformers_ext import CPULlamaForCausalLM
            model_class = CPULlamaForCausalLM
        self.checkpoint = checkpoint
        self.model = build_network(model_class, mc, checkpoint)

    def room(self, prompts: list[list[int]]) -> int:
        longest = max(len(p) for p in prompts)
        if longest >= self.seq_length:
            raise UserError(f"a prompt has {longest} tokens and seq_length is {self.seq_length}; shorten it (or "
                            "clear the history) or raise data.seq_length")
        return self.seq_length - longest

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, on_token=None,
                       return_logits: bool = False, stop=None, **kwargs) -> Generated:
        """Each prompt's continuation, the batch in one `generate` (prompts right-padded with pad_token_id, as
        MindFormers pads). Generation stops at the eos ids or after max_new_tokens (and at seq_length), or once
        `stop(each sequence's tokens so far)` is true (then a sequence's tokens run past its eos: cut them)."""
        import numpy as np
        if len(prompts) > self.batch_size and self.model.use_past:
            raise UserError(f"{len(prompts)} prompts in one batch, but the KV cache was sized for "
                            f"phase.batch_size={self.batch_size}; raise phase.batch_size")
        new = min(max_new_tokens, self.room(prompts))
        width = max(len(p) for p in prompts)
        batch = np.full((len(prompts), width), self.pad_token_id, dtype=np.int32)
        for i, p in enumerate(prompts):
            batch[i, :len(p)] = p
        streamer = Streamer(on_token, stop, len(prompts))
        if return_logits:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        t0 = time.perf_counter()
        try:
            out = self.model.generate(batch.tolist(), max_new_tokens=new, streamer=streamer, **kwargs)
        except StopGeneration:
            if getattr(self.model, "block_mgr", None):     # as generate() ends: the cache blocks back to the pool
                self.model.block_mgr.clear_cache()
            return Generated(streamer.tokens, time.perf_counter() - t0, streamer.first_token_s)
        seconds = time.perf_counter() - t0
        sequences = out["sequences"] if return_logits else out
        new_ids = [[int(x) for x in seq[len(p):]] for seq, p in zip(sequences, prompts)]
        logits = None
        if return_logits:
            logits = [np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x).reshape(len(prompts), -1)
                      for x in out["logits"]]
        return Generated(new_ids, seconds, streamer.first_token_s, logits)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, on_token=None, **kwargs) -> tuple[list[int], float]:
        """(new token ids, seconds) of one prompt."""
        done = self.generate_batch([prompt_ids], max_new_tokens, on_token=on_token, **kwargs)
        return done.new_ids[0], done.seconds
