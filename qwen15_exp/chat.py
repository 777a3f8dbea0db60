"""`python -m qwen15_exp.chat`: multi-turn chat with a Qwen1.5 model in the ChatML template.

    python -m qwen15_exp.chat model=0_5b phase.load_checkpoint=/path/Qwen1.5-0.5B-Chat     # interactive
    python -m qwen15_exp.chat chat.mode=demo                                                  # preset questions
    python -m qwen15_exp.chat chat.mode=batch chat.questions='[你好,"What is MindSpore?"]'

Commands while chatting: /clear empties the history, /exit or /quit leaves. Tokens stream to the terminal
as they come; the answer is cut at <|im_end|> (or <|im_start|>). The prompt follows the seed's
make_context: the system turn, then history turns (newest kept first, while they fit in max_window_size),
then the question and `<|im_start|>assistant\\n`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from qwen15_exp.data.chatml import STOP_IDS, cut_at_stop, make_context
from qwen15_exp.data.tokenizer import load_tokenizer

DEMO_QUESTIONS = ["你好", "给我讲一个年轻人奋斗创业最终取得成功的故事。", "给这个故事起一个标题"]


@dataclass
class ChatSession:
    generator: object
    tokenizer: object
    system: str
    max_new_tokens: int
    keep_history: bool = True
    history: list = field(default_factory=list)
    gen_kwargs: dict = field(default_factory=dict)
    out: object = sys.stdout
    transcript: object = None             # a path: every turn appended as a JSON line

    @property
    def max_window_size(self) -> int:
        return self.generator.seq_length - self.max_new_tokens - 1

    def ask(self, query: str) -> str:
        prompt = make_context(self.tokenizer, query, self.history if self.keep_history else [], self.system,
                              self.max_window_size)
        streamed: list[int] = []
        printed = [0]
        stopped = [False]

        def on_token(token: int):
            if stopped[0] or token in STOP_IDS:
                stopped[0] = True
                return
            streamed.append(token)
            text = self.tokenizer.decode(streamed)
            if not text.endswith("\ufffd"):          # wait for the rest of a multi-byte character
                self.out.write(text[printed[0]:])
                self.out.flush()
                printed[0] = len(text)

        done = self.generator.generate_batch([prompt], self.max_new_tokens, on_token=on_token, **self.gen_kwargs)
        new_ids = done.new_ids[0]
        answer_ids = cut_at_stop(new_ids)
        answer = self.tokenizer.decode(answer_ids).strip()
        ended = self.ended_by(answer_ids, new_ids)
        if not answer_ids:
            self.out.write(f"(no answer: the model's first token was {ended})")
        self.out.write("\n")
        self.out.write(f"[prompt {len(prompt)} tokens, history {len(self.history)} turns, answer "
                       f"{len(answer_ids)} tokens, ended by {ended}, {speed(done)}]\n")
        self.out.flush()
        self.record(query, answer, answer_ids, new_ids, prompt, done)
        if self.keep_history:
            self.history.append((query, answer))
        return answer

    def ended_by(self, answer_ids: list, new_ids: list) -> str:
        stop = new_ids[len(answer_ids)] if len(answer_ids) < len(new_ids) else None
        return STOP_IDS.get(stop, f"token {stop}") if stop is not None else f"max_new_tokens={self.max_new_tokens}"

    def record(self, query: str, answer: str, answer_ids: list, new_ids: list, prompt: list, done) -> None:
        """One turn appended to the transcript (JSON lines)."""
        if not self.transcript:
            return
        import json
        with open(self.transcript, "a", encoding="utf-8") as f:
            f.write(json.dumps({"query": query, "answer": answer, "answer_tokens": len(answer_ids),
                                "ended_by": self.ended_by(answer_ids, new_ids), "prompt_tokens": len(prompt),
                                "history_turns": len(self.history), "seconds": round(done.seconds, 3),
                                "first_token_s": done.first_token_s, "batch": len(done.new_ids)},
                               ensure_ascii=False) + "\n")


def batch_speed(done) -> str:
    tokens = sum(len(ids) for ids in done.new_ids)
    first = f", first token {done.first_token_s:.2f} s" if done.first_token_s is not None else ""
    return f"batch of {len(done.new_ids)}: {tokens} tokens in {done.seconds:.2f} s{first}, {tokens / done.seconds:.1f} tokens/s"


def speed(done) -> str:
    """'1.84 s: first token 0.31 s, 12.4 tokens/s' for one generate call."""
    tokens = len(done.new_ids[0])
    parts = [f"{done.seconds:.2f} s"]
    if done.first_token_s is not None:
        parts.append(f"first token {done.first_token_s:.2f} s")
        if tokens > 1 and done.seconds > done.first_token_s:
            parts.append(f"{(tokens - 1) / (done.seconds - done.first_token_s):.1f} tokens/s")
    return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def ask_batch(session: ChatSession, queries: list[str]) -> list[str]:
    """Questions without history, generated as one batch; each answer printed after it, then the batch's speed."""
    prompts = [make_context(session.tokenizer, q, [], session.system, session.max_window_size) for q in queries]
    done = session.generator.generate_batch(prompts, session.max_new_tokens, **session.gen_kwargs)
    answers = []
    for q, prompt, new_ids in zip(queries, prompts, done.new_ids):
        answer_ids = cut_at_stop(new_ids)
        answer = session.tokenizer.decode(answer_ids).strip()
        session.out.write(f"user> {q}\nassistant> {answer}\n")
        session.record(q, answer, answer_ids, new_ids, prompt, done)
        answers.append(answer)
    session.out.write(f"[{batch_speed(done)}]\n")
    session.out.flush()
    return answers


def interactive(session: ChatSession, stdin=sys.stdin) -> None:
    out = session.out
    out.write(f"chat: /clear empties the history, /exit leaves; the turns are kept in {session.transcript}\n")
    while True:
        out.write("user> ")
        out.flush()
        line = stdin.readline()
        if not line:
            break
        query = line.strip()
        if not query:
            continue
        if query in ("/exit", "/quit"):
            break
        if query == "/clear":
            session.history.clear()
            out.write("history cleared\n")
            continue
        out.write("assistant> ")
        session.ask(query)


def task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from qwen15_exp.compose import to_experiment
    run_chat(to_experiment(cfg), HydraConfig.get().runtime.output_dir)


def main() -> None:
    from qwen15_exp.cli import run_app
    run_app("chat", task)


def run_chat(exp, run_dir: str) -> None:
    """compose -> validate -> weights -> plan, as for a run, then a chat session instead of a launch."""
    from pathlib import Path

    from qwen15_exp.errors import UserError
    from qwen15_exp.adapt import adapt
    from qwen15_exp.estimate.memory import estimate_memory
    from qwen15_exp.launch.choose import choose_launcher
    from qwen15_exp.launch.generate import Generator, answer_tokens, generation_kwargs
    from qwen15_exp.launch.start import in_run_dir
    from qwen15_exp.layout import layout_of
    from qwen15_exp.plan import make_plan
    from qwen15_exp.run_files import mindformers_env
    from qwen15_exp.validate import InvalidExperiment, validate
    from qwen15_exp.weights.checkpoint import resolve_checkpoint

    layout, adapted = layout_of(exp), adapt(exp)
    choice = choose_launcher(exp, layout)
    if choice.launcher != "local":
        raise UserError(f"interactive chat runs on one device in this process; here: {choice.why}. Use "
                        "hardware=cpu (or a single NPU), or phase=chat with python -m qwen15_exp for a planned "
                        "multi-device run")
    memory = estimate_memory(exp, layout, adapted)
    problems = validate(exp, layout, memory, choice.executes)
    if problems:
        raise InvalidExperiment(problems)
    run_dir = Path(run_dir)
    resolve_checkpoint(exp, layout.devices)
    plan = make_plan(exp, run_dir, layout=layout, memory=memory, adapted=adapted, choice=choice)
    # plan.env: the compile cache, so a second chat reuses the first one's graphs
    with in_run_dir(run_dir, {**mindformers_env(run_dir), **plan.env}):
        if not exp.phase.load_checkpoint:
            print("note: no phase.load_checkpoint given: the model has random weights (text is meaningless, "
                  "the mechanics are real)")
        generator = Generator(plan.mindformers, exp.phase.load_checkpoint, quiet=True)
        opts = exp.chat
        session = ChatSession(generator, load_tokenizer(exp.data.tokenizer_dir or None), exp.phase.system_prompt,
                              answer_tokens(exp.phase.generation, 0, exp.data.seq_length), keep_history=opts.history,
                              gen_kwargs=generation_kwargs(exp, opts.seed), transcript=run_dir / "transcript.jsonl")
        if opts.mode == "interactive":
            interactive(session)
        else:
            questions = DEMO_QUESTIONS if opts.mode == "demo" else list(opts.questions or exp.phase.predict_data)
            if opts.mode == "demo":
                session.keep_history = True
            if session.keep_history:              # each question sees the answers before it: one at a time
                for q in questions:
                    print(f"user> {q}\nassistant> ", end="", flush=True)
                    session.ask(q)
            else:
                for start in range(0, len(questions), exp.phase.batch_size):
                    ask_batch(session, questions[start:start + exp.phase.batch_size])
        print(f"transcript: {session.transcript}")


if __name__ == "__main__":
    main()
