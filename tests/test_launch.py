"""Launch scripts for clusters, data-parallel msrun runs on this CPU, and Hydra's submitit launcher."""
import json
import os
import stat
import subprocess
import sys

import psutil
import pytest

from helpers import only_run_dir, read_json, run_cli

FAKE_MSRUN = """#!/usr/bin/env python3
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in
      ("MS_ASCEND_CHECK_OVERFLOW_MODE", "HCCL_BUFFSIZE", "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT")},
      "cwd": os.getcwd()}))
sys.exit(int(os.environ.get("FAKE_MSRUN_EXIT", "0")))
"""


def msrun_call(stdout: str) -> dict:
    """The fake msrun's record among the node script's other lines (its echo, node 0's collected summary)."""
    (line,) = [x for x in stdout.splitlines() if x.startswith('{"argv"')]
    return json.loads(line)


def fake_msrun(tmp_path):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    exe = bin_dir / "msrun"
    exe.write_text(FAKE_MSRUN)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_plan_writes_one_quoted_msrun_script_per_node(tmp_path):
    refused = run_cli(["model=72b", "phase=finetune", "parallel=mp8pp4", "launch.master_addr='10.0.0.1; touch PWNED'"],
                      tmp_path / "refused")
    assert refused.returncode == 2 and "launch.master_addr" in refused.stderr   # no host: refused before a script
    hostile = "node0.cluster-a.example"
    r = run_cli(["model=72b", "phase=finetune", "parallel=mp8pp4", f"launch.master_addr='{hostile}'",
                 "launch.master_port=9123", "+hardware.env.HCCL_BUFFSIZE='2 $(touch PWNED2)'"], tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = next((tmp_path / "outputs").rglob("plan.json")).parent
    scripts = sorted(run_dir.glob("launch_node*.sh"))
    assert [s.name for s in scripts] == [f"launch_node{i}.sh" for i in range(4)]
    assert (run_dir / "worker.py").is_file()
    bin_dir = fake_msrun(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "QWEN15_EXP_VERBOSE": "1"}
    for rank, script in enumerate(scripts):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        call = msrun_call(out.stdout)
        assert call["argv"][:9] == ["--worker_num=32", "--local_worker_num=8", f"--master_addr={hostile}",
                                    "--master_port=9123", f"--node_rank={rank}", f"--log_dir=msrun_log/node{rank}",
                                    "--join=True", f"--tail_worker_log={8 * rank}", "--cluster_time_out=7200"]
        assert call["argv"][9:] == ["--bind_core=True", "worker.py", "--config", "mindformers.yaml"]
        assert call["env"] == {"MS_ASCEND_CHECK_OVERFLOW_MODE": "INFNAN_MODE", "HCCL_BUFFSIZE": "2 $(touch PWNED2)",
                               "HCCL_CONNECT_TIMEOUT": "1800", "HCCL_EXEC_TIMEOUT": "1800"}
        assert call["cwd"] == str(run_dir)
        assert f"node {rank}: msrun, master {hostile}:9123, logs in {run_dir}/msrun_log/node{rank}" in out.stdout
    # overrides at launch time reach msrun and the worker
    out = subprocess.run(["bash", str(scripts[0])], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "MASTER_ADDR": "node0.cluster", "TRAIN_DATA": "/data/alpaca mr"})
    argv = msrun_call(out.stdout)["argv"]
    assert "--master_addr=node0.cluster" in argv and argv[-2:] == ["--train_dataset_dir", "/data/alpaca mr"]
    assert not list(tmp_path.rglob("PWNED*"))


def test_a_node_script_without_master_addr_stops_at_once(tmp_path):
    """A plan of several nodes whose master is the loopback: without MASTER_ADDR every node script says so and
    exits 2 before msrun (which would wait 2 h for a master); with it, msrun starts."""
    r = run_cli(["model=72b", "phase=finetune", "parallel=mp8pp4"], tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = only_run_dir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MASTER_ADDR"}
    env["PATH"] = f"{fake_msrun(tmp_path)}{os.pathsep}{env['PATH']}"
    env["QWEN15_EXP_VERBOSE"] = "1"                    # msrun's output on stdout, where the fake writes its record
    out = subprocess.run(["bash", str(run_dir / "launch_node1.sh")], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "MASTER_ADDR=<node 0 address>" in out.stderr and '{"argv"' not in out.stdout
    out = subprocess.run(["bash", str(run_dir / "launch_node1.sh")], env={**env, "MASTER_ADDR": "10.1.2.3"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--master_addr=10.1.2.3" in msrun_call(out.stdout)["argv"]


def test_node_scripts_check_the_weights_and_node0_collects_the_ranks(tmp_path):
    """A plan's weights may exist only on the cluster: planned, then checked by the node script before msrun.
    After msrun, node 0 turns the plan's result.json into the run's (status from msrun's exit, the ranks' steps)."""
    r = run_cli(["model=7b", "phase=lora", "parallel=mp8", "phase.max_steps=4",
                 "phase.load_checkpoint=/cluster/models/Qwen1.5-7B-Chat"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "learning rate 0.0001" in r.stdout and "not on this machine" in r.stdout
    run_dir = only_run_dir(tmp_path)
    written = (run_dir / "mindformers.yaml").read_text()
    assert "auto_trans_ckpt: true" in written and "/cluster/models/Qwen1.5-7B-Chat" in written
    env = {**os.environ, "PATH": f"{fake_msrun(tmp_path)}{os.pathsep}{os.environ['PATH']}",
           "MASTER_ADDR": "127.0.0.1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(run_dir / "launch_node0.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "/cluster/models/Qwen1.5-7B-Chat are not on this node" in out.stderr
    weights = tmp_path / "weights.ckpt"
    weights.write_text("stands in")
    for rank in range(8):                      # what the workers would have logged: 4 steps each
        (run_dir / f"steps_rank{rank}.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 10.0 - s - rank / 10, "step_s": 0.5}) + "\n" for s in range(1, 5)))
    out = subprocess.run(["bash", str(run_dir / "launch_node0.sh")], capture_output=True, text=True, timeout=120,
                         env={**env, "LOAD_CHECKPOINT": str(weights)})
    assert out.returncode == 0, out.stderr
    result = read_json(run_dir / "result.json")
    assert result["status"] == "ok" and result["measured"]["steps"] == 4
    assert result["measured"]["ranks_collected"] == "8 of 8"
    assert abs(result["measured"]["first_loss"] - (9.0 - 0.35)) < 1e-9     # the mean over the 8 ranks
    assert "[ok]" in out.stdout
    # msrun's own output went to a file, the terminal got the progress line (4 of 4 steps: all were logged)
    assert '{"argv"' not in out.stdout and "4/4" in out.stderr
    assert '{"argv"' in (run_dir / "msrun_log" / "node0" / "msrun_console.log").read_text()
    out = subprocess.run(["bash", str(run_dir / "launch_node0.sh")], capture_output=True, text=True, timeout=120,
                         env={**env, "LOAD_CHECKPOINT": str(weights), "FAKE_MSRUN_EXIT": "3"})
    assert out.returncode == 3
    assert read_json(run_dir / "result.json")["status"] == "failed"


def test_plan_prints_what_an_operator_needs(tmp_path):
    r = run_cli(["model=72b", "phase=finetune", "parallel=mp8pp4"], tmp_path)
    out = r.stdout
    for needle in ("devices 32 = 4 node(s) x up to 8", "global batch 64", "tokens/step 131,072",
                   "72,287,920,128", "per device", "GB budget", "NOTHING WAS EXECUTED", "launch_node3.sh"):
        assert needle in out, needle


@pytest.mark.slow
def test_data_parallel_on_cpu_through_msrun(tmp_path):
    r = run_cli(["parallel=dp2", "hardware=cpu", "phase.max_steps=6"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    result = read_json(run_dir / "result.json")
    m = result["measured"]
    assert result["plan"]["launcher"] == "msrun" and result["plan"]["devices"] == 2
    assert [rk["rank"] for rk in m["ranks"]] == [0, 1]
    assert all(len(rk["loss"]) == 6 for rk in m["ranks"])
    assert m["ranks"][0]["loss"] != m["ranks"][1]["loss"]              # each rank reads its own shard
    assert m["steps"] == 6 and m["tokens_per_s"] > 0 and m["loss_decreased"]
    assert (run_dir / "msrun_log" / "node0").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "outputs"]


def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    r = run_cli(["-m", "hydra/launcher=submitit_local", "model=0_5b,7b", "hardware=atlas_800t_a2",
                 "parallel=dp8"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = sorted(tmp_path.glob("outputs/multirun/*/*/*/result.json"))
    assert sorted(read_json(p)["model"] for p in results) == ["0_5b", "7b"]
    assert list(tmp_path.glob("outputs/multirun/*/*/.submitit"))         # submitit's own job folders


@pytest.mark.slow
def test_cpu_sweep_measures_and_estimates(tmp_path):
    r = run_cli(["-m", "model=tiny", "parallel=single,dp2", "hardware=cpu", "phase.max_steps=6"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import csv
    sweep = next(tmp_path.glob("outputs/multirun/*/*"))
    rows = list(csv.DictReader((sweep / "sweep_report.csv").open()))
    assert [row["parallel"] for row in rows] == ["single", "dp2"]
    assert all(float(row["measured"]) > 0 and float(row["estimated"]) > 0 and row["est/meas"] for row in rows)
    # the terminal: one line per job, and a progress line for each, msrun's (dp2) read from rank 0's steps log
    assert [line.split()[1:3] for line in r.stdout.splitlines() if line.startswith("job ")] == \
        [["0", "ok"], ["1", "ok"]]
    assert " - mindformers" not in r.stdout + r.stderr and "per_step_time" not in r.stdout + r.stderr
    assert "job 0 6/6" in r.stderr and "job 1 6/6" in r.stderr
    assert "per_step_time" in (sweep / "1" / "output" / "log" / "console.log").read_text()    # msrun's tail, kept
    for job in ("0", "1"):              # each job's own figures, counted from its own start
        result = read_json(sweep / job / "result.json")
        assert 0 < result["measured"]["time_to_first_step_s"] < result["wall_time_s"]
        assert result["measured"]["peak_rss_mb"] > 100


@pytest.mark.slow
def test_predict_plan_runs_through_msrun_and_trainer_predict(tmp_path):
    """The path an Ascend predict plan takes (msrun -> worker), executed here on CPU with two workers: the generated
    texts reach result.json and the summary as the in-process run's do."""
    r = run_cli(["phase=predict", "parallel=dp2", "phase.predict_data=[hello world]",
                 "phase.generation.max_decode_length=24"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "tokenizer.json").is_file() and read_json(run_dir / "predict_data.json")["inputs"] == ["hello world"]
    result = read_json(run_dir / "result.json")
    # the same shape as the in-process predict: one record per prompt (the answer without the prompt), the
    # tokens counted, the rate, and the summary's lines
    [generated] = result["generated"]
    assert generated["prompt"] == "hello world" and not generated["text"].startswith("hello world")
    assert result["measured"]["generated_tokens"] == generated["new_tokens"] > 0
    assert result["measured"]["tokens_per_s"] > 0
    assert generated["new_tokens"] == 24 - 2              # max_decode_length bounds the prompt (2 tokens) + answer
    assert f"generated {generated['new_tokens']} tokens" in r.stdout and "> 'hello world' -> " in r.stdout


@pytest.mark.parametrize("overrides, per_node", [
    (["model=7b", "parallel=dp8", "hardware=atlas_800t_a2", "phase.max_steps=100"], 8),
    (["model=72b", "phase=finetune", "parallel=mp8pp4", "phase.max_steps=100"], 8),
    (["hardware=cpu", "parallel=dp2", "parallel.nodes=2", "launch.mode=plan", "phase.max_steps=100"], 1)])
def test_a_plan_keeps_max_steps_and_splits_workers_over_nodes(tmp_path, overrides, per_node):
    """Plans stop where the user asked (the report: a 100-step Ascend plan trained a whole epoch), and each
    node's script starts its own share of the workers (the report: 2 x 2 workers for a world of 2)."""
    r = run_cli(overrides, tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = only_run_dir(tmp_path)
    cfg = yaml_of(run_dir)
    assert {"type": "TrainCallBack", "stop_step": 100} in cfg["callbacks"]
    assert cfg["lr_schedule"]["total_steps"] == 100
    for script in run_dir.glob("launch_node*.sh"):
        assert f"--local_worker_num={per_node} " in script.read_text()


def test_nodes_must_split_the_devices_evenly(tmp_path):
    r = run_cli(["hardware=cpu", "parallel=dp2", "parallel.nodes=3", "launch.mode=plan"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "do not split evenly over nodes=3" in r.stderr and "parallel.nodes=1" in r.stderr


@pytest.mark.slow
def test_two_node_scripts_rendezvous_on_this_machine_and_train_as_dp2(tmp_path):
    """The plan's launch_node0.sh and launch_node1.sh, started as two processes as the plan says (master address
    127.0.0.1), find each other through msrun's multi-node options and train exactly as dp2 on one node."""
    import signal

    from qwen15_exp.launch.msrun import free_port
    one = run_cli(["parallel=dp2", "hardware=cpu", "phase.max_steps=6"], tmp_path / "one")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    one_dir = only_run_dir(tmp_path / "one")
    dataset = yaml_of(one_dir)["train_dataset"]["data_loader"]["dataset_dir"]
    one_losses = {rk["rank"]: rk["loss"] for rk in read_json(one_dir / "result.json")["measured"]["ranks"]}

    r = run_cli(["parallel=dp2", "hardware=cpu", "parallel.nodes=2", "launch.mode=plan", "phase.max_steps=6"],
                tmp_path / "two")
    assert r.returncode == 0, r.stderr
    assert "MASTER_ADDR=<node 0 address> TRAIN_DATA=<dataset dir> bash" in r.stdout
    run_dir = only_run_dir(tmp_path / "two")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "TRAIN_DATA": dataset}
    nodes = [subprocess.Popen(["bash", str(run_dir / f"launch_node{r}.sh")], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for r in (1, 0)]                              # node 1 first: it waits for node 0's scheduler
    try:
        codes = [p.wait(timeout=600) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert codes == [0, 0]                                 # --join=True: each node returns its workers' status
    for node in (0, 1):                                    # each node ran exactly its own worker, logged apart
        assert sorted(p.name for p in (run_dir / "msrun_log" / f"node{node}").glob("worker_*.log")) == [
            f"worker_{node}.log"]
    two_losses = {rank: read_json(run_dir / f"rank_{rank}.json")["losses"] for rank in (0, 1)}
    assert two_losses == one_losses and all(len(v) == 6 for v in two_losses.values())
    assert not [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == str(run_dir)]    # nothing left


def yaml_of(run_dir):
    import yaml
    return yaml.safe_load((run_dir / "mindformers.yaml").read_text())


def test_the_compile_cache_key_follows_the_graph_not_the_paths(experiment, tmp_path):
    from qwen15_exp.compile_cache import ENABLE, PATH, cache_key, is_shared
    from qwen15_exp.plan import make_plan
    from qwen15_exp.plan import Dataset

    def key(overrides, run_dir):
        plan = make_plan(experiment(["hardware=cpu", *overrides]), run_dir, Dataset("/data/x", rows=64))
        assert plan.env[ENABLE] == "1"
        return plan.env[PATH]
    base = key([], tmp_path / "a")
    assert key([], tmp_path / "b") == base                                  # another run dir, same graph
    assert key(["phase.checkpoint.save_steps=7"], tmp_path / "a") == base   # callbacks are not in the graph
    for changed in (["phase.lr_schedule.learning_rate=3e-4"], ["model.num_layers=3"], ["phase.seed=7"],
                    ["phase.max_steps=9"], ["hardware.jit_level=O1"]):
        assert key(changed, tmp_path / "a") != base, changed
    assert cache_key({"x": 1}, ".", {}, {"mindspore": "2.9.0"}) != cache_key({"x": 1}, ".", {}, {"mindspore": "2.8.0"})
    plan = make_plan(experiment(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2"]), tmp_path / "p")
    assert plan.env[PATH] == "compile_cache"                                # beside the run on the cluster
    assert is_shared(base) and not is_shared(plan.env[PATH])               # only the shared folders are pruned
    assert make_plan(experiment(["hardware=cpu", "launch.compile_cache=false"]), tmp_path / "a").env.get(ENABLE) is None


def test_the_compile_cache_key_follows_our_own_graph_code(monkeypatch):
    """MindSpore skips files under sys.path when it checks a cached graph; a change of our train step or loss
    must not reuse a graph compiled from the old code."""
    from qwen15_exp import compile_cache
    before = compile_cache.cache_key({"x": 1}, ".", {}, {})
    monkeypatch.setattr(compile_cache, "own_graph_code", lambda: "changed")
    assert compile_cache.cache_key({"x": 1}, ".", {}, {}) != before


def test_the_shared_compile_cache_stays_under_its_size_least_recently_used_going_first(tmp_path):
    import os
    from qwen15_exp.compile_cache import IN_USE_S, prune
    now = 1_000_000.0
    for age_h, name in ((5, "old"), (3, "older_used"), (2, "recent"), (0.1, "running")):
        folder = tmp_path / name / "rank_0" / "graph_cache"
        folder.mkdir(parents=True)
        (folder / "g.mindir").write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (now - age_h * 3600, now - age_h * 3600))
    os.utime(tmp_path / "older_used", (now - 6 * 3600, now - 6 * 3600))   # used least recently of all
    removed = prune(tmp_path / "new", max_bytes=2500, now=now)
    assert [p.name for p in removed] == ["older_used", "old"]               # oldest use first, until 2 x 1000 left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "recent", "running"]
    # over the size with only folders in use or this run's: nothing more goes
    assert prune(tmp_path / "new", max_bytes=0, now=(tmp_path / "recent").stat().st_mtime + IN_USE_S / 2) == []


DEFERRED_NLTK = """
import sys, time
from qwen15_exp.launch.start import defer_nltk_init, skip_pytorch_import
skip_pytorch_import()
defer_nltk_init()
import mindformers.core.metric.metric as metric
loaded = sorted(name for name in sys.modules if name.startswith("nltk"))
score = metric.sentence_bleu([list("abcdef")], list("abcdxf"), smoothing_function=metric.SmoothingFunction().method3)
import nltk
from nltk import ngrams                  # any other use of nltk: its own __init__ runs, all of it is there
print(loaded, score, list(ngrams("abc", 2)), "nltk.chunk" in sys.modules)
"""


@pytest.mark.slow
def test_mindformers_imports_the_real_bleu_without_all_of_nltk(tmp_path):
    # nltk's package __init__ (1.1 s of every run's start) waits for a use; MindFormers' metric gets the real
    # sentence_bleu: the same score as nltk imported whole
    r = subprocess.run([sys.executable, "-c", DEFERRED_NLTK], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "LOG_MF_PATH": str(tmp_path / "log")})
    assert r.returncode == 0, r.stderr[-2000:]
    whole = subprocess.run([sys.executable, "-c", "from nltk.translate.bleu_score import sentence_bleu, "
                            "SmoothingFunction as S; print(sentence_bleu([list('abcdef')], list('abcdxf'), "
                            "smoothing_function=S().method3))"], capture_output=True, text=True, check=True)
    loaded, rest = r.stdout.strip().splitlines()[-1].split("] ", 1)     # the last line: MindFormers logs before it
    assert loaded == "['nltk', 'nltk.collections', 'nltk.internals', 'nltk.translate', 'nltk.translate.bleu_score', " \
                     "'nltk.util'"
    score, *_, chunk = rest.split(" ")
    assert float(score) == float(whole.stdout) and chunk == "True"
    assert "[('a', 'b'), ('b', 'c')]" in rest
