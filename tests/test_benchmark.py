"""Benchmarks through lm-evaluation-harness (`phase=eval eval.tasks=[...]`): the knobs are checked, a task whose
data is not here stops before any model is built, and on a briefly trained tiny model our `qwen15_exp` model
gives what lm-eval's own `hf` model gives on the Hugging Face export of the same weights (per-request
loglikelihoods, greedy flags, generations, metrics), plain and in the ChatML template; a sweep over two
checkpoints reports the trained one higher, with lm-eval's standard error.

The tasks are written by the tests over local JSON (tests/lm_eval_tasks.py): multiple choice in MMLU's and in
C-Eval's (Chinese) format, rolling perplexity, and generation with exact match.
"""
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import make_experiment, only_run_dir, read_json, run_cli
from lm_eval_tasks import TASK_NAMES, task_yaml, training_text, write_tasks
from qwen15_exp.validate import validate

TASKS = "eval.tasks=[" + ",".join(TASK_NAMES) + "]"
SEED = 1234


def problems_of(overrides):
    return [str(p) for p in validate(make_experiment(overrides), executes=False)]


def test_benchmark_knobs_are_checked_all_at_once():
    said = "\n".join(problems_of(["phase=finetune", "eval.tasks=[mmlu]", "eval.limit=-3", "eval.batch_size=0",
                                  "eval.fewshot_as_multiturn=true", "parallel=dp2", "hardware=cpu",
                                  "eval.include_path=[/nonexistent/tasks]"]))
    for part in ("benchmarks with phase=finetune", "run them with phase=eval", "eval.limit: -3", "eval.batch_size: 0",
                 "set eval.apply_chat_template=true", "benchmarks on 2 devices", "/nonexistent/tasks is not a folder"):
        assert part in said, said
    ok = problems_of(["phase=eval", "phase.load_checkpoint=/cluster/w.ckpt", "eval.tasks=[mmlu]", "eval.limit=0.1",
                      "data=none"])
    assert not [p for p in ok if "eval" in p.split(":")[0] or "data" in p.split(":")[0]], ok


def test_the_chat_template_is_qwen15s_as_transformers_applies_it(tmp_path):
    """lm-eval's `hf` model renders chats with the tokenizer's template (add_generation_prompt, or the last
    message left open with continue_final_message); ours must give the same text."""
    from transformers import AutoTokenizer

    from qwen15_exp.data.chatml import chatml_text
    from qwen15_exp.weights.hf_conversion import write_hf_tokenizer
    write_hf_tokenizer(tmp_path, make_experiment(["model=tiny"]).model)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    chats = [[{"role": "user", "content": "第1题：选出答案。\nA. 苹果"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
              {"role": "assistant", "content": "A."}, {"role": "user", "content": "And?"}],
             [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer:"}]]
    for chat in chats:
        for add in (True, False):
            if not add and chat[-1]["role"] != "assistant":
                continue
            theirs = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add,
                                             continue_final_message=not add)
            assert chatml_text(chat, add) == theirs


def test_loglikelihood_inputs_are_shared_and_cut_as_lm_eval_cuts():
    from qwen15_exp.lm_eval_model import model_input, shared_inputs, token_logprobs
    assert model_input([1, 2, 3], [4, 5], max_length=3) == [2, 3, 4]        # the hf model's left cut
    assert model_input([1], [2], max_length=8) == [1]
    # MMLU: four one-token answers after one question share one input; a longer input goes first
    reqs = [(None, [1, 2, 3], [9]), (None, [1, 2, 3], [8]), (None, [7, 7, 7, 7], [1]), (None, [1, 2, 3], [7])]
    inputs, which = shared_inputs(reqs)
    assert inputs == [(7, 7, 7, 7), (1, 2, 3)] and which == [1, 1, 0, 1]
    x = np.array([[1000.0, 1000.0, -1e30], [0.0, 1.0, 2.0]], dtype=np.float32)     # no overflow
    picked, greedy = token_logprobs(x, np.array([1, 0]))
    assert np.allclose(picked, [-np.log(2), -np.log(1 + np.e + np.e ** 2)]) and list(greedy) == [0, 2]
    # 151,936 logits: within 1e-6 of float64 (a float32 log_softmax is not)
    logits = np.random.default_rng(0).normal(0, 4, (3, 151936)).astype(np.float32)
    exact = logits.astype(np.float64)
    exact = exact - exact.max(-1, keepdims=True) - np.log(np.exp(exact - exact.max(-1, keepdims=True)).sum(-1))[:, None]
    assert np.abs(token_logprobs(logits, np.array([5, 6, 7]))[0] - exact[[0, 1, 2], [5, 6, 7]]).max() < 1e-6


def test_lm_evals_results_become_named_metrics_with_their_stderr():
    from qwen15_exp.benchmark import task_metrics
    from qwen15_exp.tracking import summary_metrics
    results = {"results": {"mmlu": {"alias": "mmlu", "acc,none": 0.25, "acc_stderr,none": 0.01},
                           "gsm8k": {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                                     "exact_match,flexible-extract": 0.6, "exact_match_stderr,flexible-extract": "N/A"},
                           "wikitext": {"word_perplexity,none": 20.0, "word_perplexity_stderr,none": "N/A"}},
               "higher_is_better": {"mmlu": {"acc": True}, "gsm8k": {"exact_match": True},
                                    "wikitext": {"word_perplexity": False}}}
    metrics = task_metrics(results)
    assert metrics == {
        "mmlu/acc": {"value": 0.25, "stderr": 0.01, "higher_is_better": True},
        "gsm8k/exact_match,strict-match": {"value": 0.5, "stderr": 0.1, "higher_is_better": True},
        "gsm8k/exact_match,flexible-extract": {"value": 0.6, "stderr": None, "higher_is_better": True},
        "wikitext/word_perplexity": {"value": 20.0, "stderr": None, "higher_is_better": False}}
    logged = summary_metrics({"benchmark": {"metrics": metrics}})
    assert logged["gsm8k/exact_match.strict-match"] == 0.5 and logged["mmlu/acc_stderr"] == 0.01
    assert all("," not in k for k in logged)                              # MLflow refuses commas in names


def fake_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "weights.ckpt"                   # never read: the tasks are checked first
    path.write_bytes(b"\0")
    return path


ABSENT = {"hub_task": "dataset_path: qwen15-exp-tests/not-downloaded\ndataset_name: sub\n",
          "file_task": "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {gone}\n"}


@pytest.fixture(scope="module")
def absent_tasks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("absent")
    (tmp / "tasks").mkdir()
    for name, source in ABSENT.items():
        (tmp / "tasks" / f"{name}.yaml").write_text(
            f"task: {name}\n" + source.format(gone=tmp / "gone.json") + "test_split: test\noutput_type: "
            "multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    return tmp


def test_a_task_whose_data_is_not_here_is_named_with_what_to_download_where(absent_tasks, monkeypatch):
    from qwen15_exp.benchmark import load_tasks
    from qwen15_exp.errors import UserError
    monkeypatch.setenv("HF_HOME", str(absent_tasks / "hf_home"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY"):    # load_tasks sets them
        monkeypatch.setenv(key, os.environ.get(key, "1" if key != "TRANSFORMERS_VERBOSITY" else "error"))
    said = {}
    for name in ("hub_task", "file_task", "hub_taks"):
        with pytest.raises(UserError) as e:
            load_tasks({"tasks": [name], "include_path": [str(absent_tasks / "tasks")], "cwd": str(absent_tasks)})
        said[name] = str(e.value)
    assert "task 'hub_task' needs dataset qwen15-exp-tests/not-downloaded (config 'sub')" in said["hub_task"]
    assert "datasets.load_dataset('qwen15-exp-tests/not-downloaded', 'sub')" in said["hub_task"]
    assert str(absent_tasks / "hf_home" / "datasets") in said["hub_task"]
    assert "nothing is fetched at run time" in said["hub_task"]
    assert "task 'file_task' reads json files" in said["file_task"] and "gone.json" in said["file_task"]
    assert "no task, group or tag 'hub_taks'" in said["hub_taks"] and "did you mean hub_task" in said["hub_taks"]


def test_a_missing_dataset_exits_2_before_any_weights_or_model(absent_tasks, tmp_path):
    r = run_cli(["phase=eval", f"phase.load_checkpoint={fake_checkpoint(tmp_path)}", "eval.tasks=[hub_task]",
                 f"eval.include_path=[{absent_tasks / 'tasks'}]"], tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "task 'hub_task' needs dataset qwen15-exp-tests/not-downloaded" in r.stderr
    [result_file] = (tmp_path / "outputs").rglob("result.json")
    result = read_json(result_file)
    assert result["status"] == "invalid" and not result.get("measured") and not result.get("benchmark")
    assert sorted(p.name for p in result_file.parent.iterdir()) == [".hydra", "cli.log", "result.json"]   # no plan


# ---- on a trained model (slow) ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained briefly on the tasks' own records, a nearly untrained one, the tasks, and the Hugging
    Face export of the trained weights."""
    tmp = tmp_path_factory.mktemp("bench")
    tasks = write_tasks(tmp)
    (tmp / "train.txt").write_text(training_text())
    runs = {}
    for name, extra in (("trained", ["phase.max_steps=300", "phase.lr_schedule.learning_rate=1e-2"]),
                        ("untrained", ["phase.max_steps=1", "phase.lr_schedule.learning_rate=1e-9"])):
        r = run_cli(["data=wiki", f"data.input={tmp / 'train.txt'}", "data.repeat=10", *extra], tmp / name)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = only_run_dir(tmp / name)
    checkpoint = read_json(runs["trained"] / "result.json")["checkpoint"]["file"]
    r = run_cli(["direction=mf2hf", f"input={checkpoint}", f"output={tmp / 'hf'}", "model=tiny", "progress=false"],
                tmp, module="qwen15_exp.convert")
    assert r.returncode == 0, r.stderr[-2000:]
    return {"tmp": tmp, "tasks": tasks, "hf": tmp / "hf", **runs}


def ours(trained, name: str, overrides: list[str]) -> Path:
    """Our run of the tasks (the command a user types); its lm-eval output folder."""
    r = run_cli(["phase=eval", f"phase.load_checkpoint={trained['trained']}", f"eval.include_path=[{trained['tasks']}]",
                 *overrides], trained["tmp"] / name)
    assert r.returncode == 0, r.stderr[-3000:]
    return only_run_dir(trained["tmp"] / name)


def reference(trained, tasks: list[str], **options) -> dict:
    """lm-eval's own `hf` model on the export, in a process of its own (PyTorch)."""
    script = f"""
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
res = simple_evaluate(
    model="hf", tasks={tasks!r}, batch_size=8, device="cpu", task_manager=TaskManager(include_path={str(trained['tasks'])!r}),
    # float32 weights; its log_softmax in float64 (softmax_dtype): in float32, over 151,936 logits, it rounds by
    # up to 2e-4 per request (4e-3 over a 60-token document), where ours is float64
    model_args={{"pretrained": {str(trained['hf'])!r}, "dtype": "float32", "softmax_dtype": "float64",
                # Qwen1.5 base's end of text as the rolling windows' prefix (a chat export's eos is <|im_end|>),
                # and our max_length (data.seq_length) for the same windows
                "prefix_token_id": 151643, "max_length": 128}},
    log_samples=True, random_seed={SEED}, numpy_random_seed={SEED}, torch_random_seed={SEED},
    fewshot_random_seed={SEED}, **{options!r})
json.dump({{"results": res["results"], "samples": res["samples"]}}, sys.stdout, default=str)
"""
    import subprocess
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, cwd=trained["tmp"])
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def our_samples(run_dir: Path, task: str) -> dict:
    [path] = glob.glob(str(run_dir / "lm_eval" / "*" / f"samples_{task}_*.jsonl"))
    return {s["doc_id"]: s for s in map(json.loads, Path(path).read_text().splitlines())}


def compare(run_dir: Path, ref: dict, tasks: list[str]) -> dict:
    """Per task: the largest per-request loglikelihood difference; asserts greedy flags and generations equal."""
    worst = {}
    for task in tasks:
        mine = our_samples(run_dir, task)
        assert sorted(mine) == sorted(s["doc_id"] for s in ref["samples"][task])
        worst[task] = 0.0
        for s in ref["samples"][task]:
            for theirs, ours_ in zip(s["resps"], mine[s["doc_id"]]["resps"], strict=True):
                theirs, ours_ = theirs[0], ours_[0]
                if task == "local_gen":
                    assert ours_ == theirs, (s["doc_id"], ours_, theirs)
                    continue
                if isinstance(theirs, list):                                  # (loglikelihood, is_greedy)
                    assert str(ours_[1]) == str(theirs[1]), (task, s["doc_id"])
                    theirs, ours_ = theirs[0], ours_[0]
                worst[task] = max(worst[task], abs(float(ours_) - float(theirs)))
    return worst


@pytest.mark.slow
def test_our_model_gives_lm_evals_hf_numbers_on_the_same_weights(trained):
    run_dir = ours(trained, "plain", [TASKS])
    ref = reference(trained, TASK_NAMES)
    worst = compare(run_dir, ref, TASK_NAMES)
    assert max(worst.values()) <= 1e-4, worst
    metrics = read_json(run_dir / "result.json")["benchmark"]["metrics"]
    for task in TASK_NAMES:
        for key, value in ref["results"][task].items():
            if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                name = f"{task}/{key.split(',')[0]}"
                assert metrics[name]["value"] == pytest.approx(value, rel=1e-5), name
    # more than chance: the favourite answer learned (3 in 4), the documents likelier than a uniform guess
    assert metrics["local_mmlu/acc"]["value"] > 0.6 and metrics["local_ceval/acc"]["value"] > 0.6
    assert metrics["local_gen/exact_match"]["value"] > 0.4
    assert metrics["local_rolling/bits_per_byte"]["value"] < 2
    summary = (run_dir / "summary.txt").read_text()
    assert "local_mmlu/acc" in summary and "+-" in summary and "higher is better" in summary


@pytest.mark.slow
def test_the_chat_template_and_few_shot_give_lm_evals_hf_numbers_too(trained):
    tasks = ["local_mmlu", "local_ceval"]
    run_dir = ours(trained, "chat", ["eval.tasks=[local_mmlu,local_ceval]", "eval.apply_chat_template=true",
                                     "eval.fewshot_as_multiturn=true", "eval.num_fewshot=2", "eval.limit=8"])
    ref = reference(trained, tasks, apply_chat_template=True, fewshot_as_multiturn=True, num_fewshot=2, limit=8)
    worst = compare(run_dir, ref, tasks)
    assert max(worst.values()) <= 1e-4, worst
    prompt = next(iter(our_samples(run_dir, "local_ceval").values()))["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert prompt.count("<|im_start|>assistant\n") == 3                    # two shots as turns, then the question


@pytest.mark.slow
def test_a_sweep_over_two_checkpoints_reports_the_trained_one_higher(trained):
    tmp = trained["tmp"] / "sweep"
    # a task YAML as people write them: its data file relative to where the command is typed
    (tmp / "my_tasks").mkdir(parents=True)
    (tmp / "my_tasks" / "local_mmlu.json").write_bytes((trained["tasks"] / "local_mmlu.json").read_bytes())
    (tmp / "my_tasks" / "local_mmlu.yaml").write_text(task_yaml("local_mmlu", "local_mmlu", "my_tasks/local_mmlu.json"))
    r = run_cli(["-m", "phase=eval", f"phase.load_checkpoint={trained['untrained']},{trained['trained']}",
                 "eval.tasks=[local_mmlu]", "eval.include_path=[my_tasks]"], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    [sweep] = (tmp / "outputs" / "multirun").glob("*/*")
    report = (sweep / "sweep_report.md").read_text()
    assert "Settings ranked by local_mmlu/acc (higher is better" in report
    ranked = [line for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    ranked = [line for line in ranked if "load_checkpoint" not in line and " se" in line]
    assert len(ranked) == 2 and str(trained["trained"]) in ranked[0] and str(trained["untrained"]) in ranked[1]
    rows = {r["load_checkpoint"]: r for r in __import__("csv").DictReader(open(sweep / "sweep_report.csv"))}
    better, worse = rows[str(trained["trained"])], rows[str(trained["untrained"])]
    assert float(better["local_mmlu/acc"]) - float(better["local_mmlu/acc_stderr"]) > float(worse["local_mmlu/acc"])
    assert (sweep / "sweep_report.png").stat().st_size > 10_000


def test_an_ascend_plan_carries_the_benchmark_to_its_worker_and_checks_data_there(tmp_path):
    """A cluster's datasets live on the cluster: the plan writes the harness's settings for the worker, which
    checks the tasks where it runs (mmlu is not downloaded here)."""
    r = run_cli(["model=7b", "hardware=atlas_800t_a2", "parallel=single", "phase=eval",
                 "phase.load_checkpoint=/cluster/qwen15_7b.ckpt", "eval.tasks=[mmlu,ceval-valid]", "eval.num_fewshot=5"],
                tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = only_run_dir(tmp_path)
    spec = read_json(run_dir / "benchmark.json")
    assert spec["tasks"] == ["mmlu", "ceval-valid"] and spec["num_fewshot"] == 5 and spec["max_length"] == 4096
    assert read_json(run_dir / "result.json")["status"] == "planned"
    r = run_cli(["model=7b", "hardware=atlas_800t_a2", "parallel=dp8", "phase=eval",
                 "phase.load_checkpoint=/cluster/qwen15_7b.ckpt", "eval.tasks=[mmlu]"], tmp_path / "dp8")
    assert r.returncode == 2 and "benchmarks on 8 devices" in r.stderr


@pytest.mark.slow
def test_the_worker_a_plan_starts_runs_the_benchmark_as_the_local_run_does(trained):
    """launch.mode=msrun on this CPU: the worker.py a cluster node runs, reading benchmark.json."""
    run_dir = ours(trained, "msrun", ["eval.tasks=[local_mmlu]", "eval.limit=6", "launch.mode=msrun"])
    result = read_json(run_dir / "result.json")
    assert result["plan"]["launcher"] == "msrun" and result["status"] == "ok"
    assert result["benchmark"]["samples"] == {"local_mmlu": 6} and result["benchmark"]["requests"] == 24
    assert len(our_samples(run_dir, "local_mmlu")) == 6
