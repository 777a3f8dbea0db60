"""lm-evaluation-harness's model `qwen15_exp`: the composed experiment's MindFormers network answers the
harness's three kinds of request. lm-eval's TemplateLM splits context/continuation pairs into tokens as its `hf`
model does; the rest is here:

- loglikelihood: requests whose model input is the same token sequence share one forward pass (lm-eval's own
  grouping of one-token continuations, e.g. MMLU's " A"/" B"/" C"/" D" after one question); batches are sorted
  by length and right-padded; lm_head runs only on the positions that score a continuation token (the `hf`
  model computes all 151,936 logits at every position of every request).
- loglikelihood_rolling: lm-eval's disjoint windows of max_length tokens (its utils), scored as above.
- generate_until: MindFormers' generate through the Generator that predict and chat use (the KV cache on the
  CPU); a batch ends once every sequence has met a stop string or an end token (as the `hf` model's stopping
  criteria), and each answer is cut at its first stop string.

The scoring network is the same model without the KV cache, built for any batch and length (is_dynamic) and
run kernel by kernel (PyNative: no compile per shape). Its padding mask is off: MindFormers would hide every
token equal to pad_token_id (<|endoftext|>, also lm-eval's prefix token) from attention, where the `hf` model
attends to it; right padding never reaches the positions that are scored.
"""
from __future__ import annotations

import sys
import time

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from qwen15_exp.data.tokenizer import ENDOFTEXT, IM_END_ID, PAD_ID

LM_HEAD_ROWS = 256                     # logits rows per lm_head call: 256 x 151,936 fp32 = 155 MB


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log_softmax(logits)[row, target] and the argmax of each row, without a [rows, vocab] float64 copy: the
    exponentials in float32 (after the row's max, so nothing overflows), their sum in float64. Within ~1e-6 of
    float64 throughout; the `hf` model's float32 log_softmax is off by up to 2e-4 per request."""
    top = logits.max(axis=-1, keepdims=True)
    sums = np.exp(logits - top).sum(axis=-1, dtype=np.float64)
    rows = np.arange(len(logits))
    picked = logits[rows, targets].astype(np.float64) - top[:, 0].astype(np.float64) - np.log(sums)
    return picked, logits.argmax(axis=-1)


def model_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """What the network reads for a request: context + continuation but its last token, cut from the left to
    max_length (the `hf` model's rule)."""
    return (context + continuation)[-(max_length + 1):][:-1]


def shared_inputs(requests: list[tuple]) -> tuple[list[tuple], list[int]]:
    """The distinct model inputs, longest first, and for each request the index of its input."""
    index, inputs, which = {}, [], []
    for _, inp, _ in requests:
        key = tuple(inp)
        if key not in index:
            index[key] = len(inputs)
            inputs.append(key)
        which.append(index[key])
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    rank = {old: new for new, old in enumerate(order)}
    return [inputs[i] for i in order], [rank[w] for w in which]


@register_model("qwen15_exp")
class MindFormersLM(TemplateLM):
    """lm-eval's model over a mindformers.yaml's network (its `model_config`) and a checkpoint."""

    def __init__(self, mf_config: dict, checkpoint: str = "", batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, tokenizer_dir: str | None = None):
        super().__init__()
        from qwen15_exp.data.tokenizer import load_tokenizer
        self.mf_config, self.checkpoint = mf_config, checkpoint
        model_config = mf_config["model"]["model_config"]
        self._max_length = int(max_length or model_config["seq_length"])
        self._batch_size, self._max_gen_toks = int(batch_size), int(max_gen_toks)
        self.tok = load_tokenizer(tokenizer_dir or None)
        self._scorer = self._generator = None
        self.progress_file = sys.stderr          # the terminal, even while lm-eval's own output is sent elsewhere
        # lm-eval's requests (a rolling document: one), forward passes, seconds spent building the networks
        self.stats = {"forward_passes": 0, "requests": 0, "build_s": 0.0}

    # ---- what lm-eval asks of a model ----
    @property
    def eot_token_id(self) -> int:
        return PAD_ID                  # <|endoftext|>: Qwen1.5's end of text, the prefix of rolling windows

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return "qwen15_exp-qwen2-chatml"

    def chat_template(self, chat_template: bool | str = False) -> str:
        from qwen15_exp.data.chatml import HF_CHAT_TEMPLATE
        return HF_CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from qwen15_exp.data.chatml import chatml_text
        return chatml_text(chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids      # Qwen2 adds no BOS

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- the networks, built when first needed ----
    def _model_config(self, **overrides) -> dict:
        mc = {k: v for k, v in self.mf_config["model"]["model_config"].items() if k not in ("type", "max_new_tokens")}
        return {**mc, "batch_size": self._batch_size, "seq_length": self._max_length, **overrides}

    def scorer(self):
        if self._scorer is None:
            t0 = time.perf_counter()
            from mindformers import LlamaForCausalLM

            from qwen15_exp.launch.generate import build_network, start_context
            start_context(self.mf_config, quiet=True)
            self._scorer = build_network(LlamaForCausalLM, self._model_config(use_past=False, is_dynamic=True),
                                         self.checkpoint)
            self._scorer.model.casual_mask.pad_token_id = -1     # no token is -1: nothing hidden (see above)
            self.stats["build_s"] += time.perf_counter() - t0
        return self._scorer

    def generator(self):
        if self._generator is None:
            t0 = time.perf_counter()
            from qwen15_exp.launch.generate import Generator
            from qwen15_exp.adapt import cache_blocks
            block = 32
            mc = self._model_config(use_past=True, is_dynamic=True, block_size=block,
                                    num_blocks=cache_blocks(self._batch_size, self._max_length, block))
            config = {**self.mf_config, "model": {**self.mf_config["model"], "model_config": mc}}
            config["postprocess_use_numpy"] = config["context"].get("device_target") == "CPU"
            self._generator = Generator(config, self.checkpoint, quiet=True)
            self.stats["build_s"] += time.perf_counter() - t0
        return self._generator

    # ---- loglikelihood ----
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's (context, continuation) tokenizing, without its bar (ours counts the requests)."""
        self.stats["requests"] += len(requests)
        return super().loglikelihood(requests, disable_tqdm=True)

    def hidden_states(self, inputs: list[tuple]) -> np.ndarray:
        """The last layer's (normed) hidden states of a batch of inputs, right-padded: [batch, longest, hidden]."""
        import mindspore as ms
        width = max(len(x) for x in inputs)
        ids = np.full((len(inputs), width), PAD_ID, dtype=np.int32)
        for i, x in enumerate(inputs):
            ids[i, :len(x)] = x
        mode = ms.get_context("mode")
        ms.set_context(mode=ms.PYNATIVE_MODE)
        try:
            hidden = self.scorer().model(ms.Tensor(ids))
        finally:
            ms.set_context(mode=mode)
        self.stats["forward_passes"] += 1
        return hidden.asnumpy()

    def continuation_logprobs(self, rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's log-probability of its target token and its greedy token (lm_head on these rows only, a
        block of rows at a time)."""
        import mindspore as ms
        picked, greedy = [], []
        for start in range(0, len(rows), LM_HEAD_ROWS):
            block = ms.Tensor(np.ascontiguousarray(rows[None, start:start + LM_HEAD_ROWS]))
            lp, top = token_logprobs(self.scorer().lm_head(block).asnumpy()[0], targets[start:start + LM_HEAD_ROWS])
            picked.append(lp)
            greedy.append(top)
        return np.concatenate(picked), np.concatenate(greedy)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation)."""
        disable_tqdm = False                     # TemplateLM's loglikelihood asked its own bar off, not ours
        prepared = [(req, model_input(ctx, cont, self._max_length), cont) for req, ctx, cont in requests]
        inputs, which = shared_inputs(prepared)
        by_input: dict[int, list[int]] = {}
        for r, i in enumerate(which):
            by_input.setdefault(i, []).append(r)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=bool(disable_tqdm), desc="loglikelihood requests", leave=False,
                   file=self.progress_file)
        for start in range(0, len(inputs), self._batch_size):
            batch = list(range(start, min(start + self._batch_size, len(inputs))))
            hidden = self.hidden_states([inputs[i] for i in batch])
            rows, targets, spans = [], [], []
            for b, i in enumerate(batch):
                n = len(inputs[i])
                for r in by_input[i]:
                    cont = prepared[r][2]
                    spans.append((r, len(rows), len(cont)))
                    rows.extend(hidden[b, n - len(cont):n])
                    targets.extend(cont)
            logprobs, greedy = self.continuation_logprobs(np.stack(rows), np.asarray(targets))
            for r, first, count in spans:
                cont = prepared[r][2]
                results[r] = (float(logprobs[first:first + count].sum()),
                              bool((greedy[first:first + count] == cont).all()))
                self.cache_hook.add_partial("loglikelihood", requests[r][0], results[r])
            bar.update(sum(len(by_input[i]) for i in batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood: lm-eval's disjoint windows of max_length tokens, each scored."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        self.stats["requests"] += len(requests)
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(n)
        scored = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, scored):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---- generate_until ----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) answers through MindFormers' generate, in batches of the same
        generation settings, longest prompt first."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        eos = self.tok_decode([PAD_ID], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(n)
        answers: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=bool(disable_tqdm), desc="generate_until requests", leave=False,
                   file=self.progress_file)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new_tokens = kwargs.pop("max_gen_toks")
            window = self._max_length - new_tokens
            if window <= 0:
                raise ValueError(f"a task asks for {new_tokens} new tokens, more than eval.max_length="
                                 f"{self._max_length} holds; raise eval.max_length")
            prompts = {n: self.tok_encode(requests[n].args[0])[-window:] for n in members}
            order = sorted(members, key=lambda n: -len(prompts[n]))
            settings = self.sampling(kwargs)
            for start in range(0, len(order), self._batch_size):
                batch = order[start:start + self._batch_size]
                done = self.generator().generate_batch(
                    [prompts[n] for n in batch], new_tokens, stop=self.stopper(until), **settings)
                for n, ids in zip(batch, done.new_ids):
                    text = postprocess_generated_text(self.tok_decode(self.until_end(ids)), until, None)
                    answers[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(batch))
        bar.close()
        self.stats["requests"] += len(requests)
        return answers

    @staticmethod
    def sampling(kwargs: dict) -> dict:
        """MindFormers generate() settings from a task's generation_kwargs: greedy unless it samples, no
        repetition penalty unless it asks for one; both end tokens of a Qwen1.5 chat export's
        generation_config (<|im_end|>, <|endoftext|>) end an answer."""
        out = {"do_sample": bool(kwargs.get("do_sample")), "eos_token_id": [IM_END_ID, PAD_ID],
               "repetition_penalty": float(kwargs.get("repetition_penalty") or 1.0)}
        if out["do_sample"]:
            out.update(temperature=float(kwargs.get("temperature") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                       top_p=float(kwargs.get("top_p") or 1.0))
        return out

    @staticmethod
    def until_end(ids: list[int]) -> list[int]:
        for i, t in enumerate(ids):
            if t in (IM_END_ID, PAD_ID):
                return ids[:i]
        return ids

    def stopper(self, until: list[str]):
        """stop(tokens so far of each sequence): every sequence has an end token or a stop string."""
        def ended(ids: list[int]) -> bool:
            if any(t in (IM_END_ID, PAD_ID) for t in ids):
                return True
            text = self.tok_decode(ids)
            return any(s and s in text for s in until if s != ENDOFTEXT)
        return lambda sequences: all(ended(ids) for ids in sequences)


def requests_per_second(stats: dict, seconds: float) -> float | None:
    """Requests over the harness's time without building the networks (as a server's rate, once loaded)."""
    busy = seconds - stats["build_s"]
    return round(stats["requests"] / busy, 2) if busy > 0 and stats["requests"] else None

