"""lm-eval tasks written over local JSON, in the formats of the benchmarks people run (the tests' and the bench's):

- local_mmlu: multiple choice in MMLU's template (lm_eval/tasks/mmlu/default/_default_template_yaml);
- local_ceval: multiple choice in C-Eval's (Chinese; lm_eval/tasks/ceval/_default_ceval_yaml), acc and acc_norm;
- local_rolling: loglikelihood_rolling over short documents (word/byte perplexity, bits per byte, as wikitext);
- local_gen: generate_until with exact match (greedy, stop at a newline).

`training_text` is the same records as plain text (prompt, target and a blank line), in WikiText's paragraph
form, for a brief training that makes the scores more than chance: three answers in four are the task's
favourite (a letter, a word), which a 2-layer model learns in a hundred steps where it could not memorise items.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "violin", "desert", "copper", "garden", "rocket",
         "mirror", "forest", "candle", "island", "pepper", "silver", "window", "bridge", "planet", "anchor", "orbit"]
HANZI = ["苹果", "河流", "石头", "云朵", "老虎", "台灯", "沙漠", "花园", "火箭", "镜子", "森林", "蜡烛", "岛屿", "银子",
         "窗户", "桥梁", "星球", "铁锚"]
LETTERS = ["A", "B", "C", "D"]
TASK_NAMES = ["local_mmlu", "local_ceval", "local_rolling", "local_gen"]


def favourite(rng, usual, others):
    return usual if rng.random() < 0.75 else rng.choice(others)


def records(n: int = 24, seed: int = 0) -> dict:
    rng = random.Random(seed)
    mmlu, ceval, gen, docs = [], [], [], []
    for i in range(n):
        choices = rng.sample(WORDS, 4)
        mmlu.append({"question": f"Item {i}: which word was chosen for item {i}?", "choices": choices,
                     "answer": favourite(rng, 1, [0, 2, 3]), "subject": "local"})
        hz = rng.sample(HANZI, 4)
        ceval.append({"id": i, "question": f"第{i}题：选出第{i}题的词。", **dict(zip(LETTERS, hz)),
                      "answer": favourite(rng, "B", ["A", "C", "D"]), "explanation": ""})
        gen.append({"question": f"Code {i}?", "answer": favourite(rng, "yes", WORDS)})
    for i in range(6):
        docs.append({"text": " ".join(rng.choice(WORDS) for _ in range(12 + 3 * i)) + "."})
    return {"local_mmlu": mmlu, "local_ceval": ceval, "local_gen": gen, "local_rolling": docs}


YAMLS = {
    "local_mmlu": """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "local_ceval": """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    val: {data}
validation_split: val
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
""",
    "local_rolling": """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
    "local_gen": """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}\\nReply:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  repetition_penalty: 1.0     # the `hf` model would take Qwen1.5-Chat's 1.05 from the export's generation_config
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
""",
}


def task_yaml(kind: str, name: str, data: Path) -> str:
    """A task YAML of one of the four kinds above (local_mmlu, ...) named `name`, reading the JSON file `data`."""
    return YAMLS[kind].format(name=name, data=json.dumps(str(data)))


def write_tasks(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """Task YAMLs and their JSON data under folder/tasks; returns that folder (eval.include_path)."""
    tasks = Path(folder) / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, rows in records(n, seed).items():
        data = tasks / f"{name}.json"
        data.write_text(json.dumps(rows, ensure_ascii=False))
        (tasks / f"{name}.yaml").write_text(task_yaml(name, name, data))
    return tasks


def prompt_mmlu(r: dict) -> str:
    return (f"{r['question'].strip()}\nA. {r['choices'][0]}\nB. {r['choices'][1]}\nC. {r['choices'][2]}\n"
            f"D. {r['choices'][3]}\nAnswer: {LETTERS[r['answer']]}")


def prompt_ceval(r: dict) -> str:
    return f"{r['question'].strip()}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案：{r['answer']}"


def training_text(n: int = 24, seed: int = 0) -> str:
    """Every record with its answer, one paragraph each (WikiText paragraphs: a blank line between)."""
    rec = records(n, seed)
    paragraphs = [prompt_mmlu(r) for r in rec["local_mmlu"]] + [prompt_ceval(r) for r in rec["local_ceval"]]
    paragraphs += [f"{r['question']}\nReply: {r['answer']}" for r in rec["local_gen"]]
    paragraphs += [d["text"] for d in rec["local_rolling"]]
    random.Random(seed).shuffle(paragraphs)
    # three line ends: the paragraph after the blank line starts with one, so every answer ends at a newline
    return "\n\n\n".join(paragraphs) + "\n"
