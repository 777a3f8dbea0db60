"""Kubernetes plans: the AscendJob a plan writes is valid against the ascend-operator's CRD schema and its pod
templates against Kubernetes' own; hostile names cannot change its structure; and its pods, started here as
the operator would start them (its environment, scheduler at 127.0.0.1), train as parallel=dp2 does."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import make_experiment, only_run_dir, read_json, run_cli
from qwen15_exp.launch.k8s import dns_name, job_name, manifest, write_k8s_files
from qwen15_exp.plan import make_plan

CRD = Path(__file__).parent / "data" / "ascendjob_crd_v1.json"     # its source and version are inside
K8S_VERSION = "1.30.0"
K8S = ["launch.k8s.enabled=true", "launch.k8s.image=registry.local/qwen15_exp:1"]


def written(tmp_path, overrides, name="run"):
    exp = make_experiment([*overrides, *K8S])
    plan = make_plan(exp, tmp_path / name)
    path = write_k8s_files(plan, exp)
    return exp, plan, yaml.safe_load(path.read_text()), path


def check_against_the_schemas(job: dict) -> None:
    import jsonschema
    import kubernetes_validate
    jsonschema.validate(job, json.loads(CRD.read_text())["openAPIV3Schema"])
    for role, spec in job["spec"]["replicaSpecs"].items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role.lower()}-0",
                                                               **spec["template"]["metadata"]},
               "spec": spec["template"]["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_the_72b_plan_is_an_ascendjob_the_operator_and_kubernetes_accept(tmp_path):
    exp, plan, job, _ = written(tmp_path, ["model=72b", "phase=finetune", "parallel=mp8pp4"])
    check_against_the_schemas(job)
    replicas = job["spec"]["replicaSpecs"]
    assert (replicas["Scheduler"]["replicas"], replicas["Worker"]["replicas"]) == (1, 4)
    assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 5
    worker = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert worker["name"] == "ascend" and worker["ports"] == [{"containerPort": 2222, "name": "ascendjob-port"}]
    assert worker["resources"]["requests"] == {"huawei.com/Ascend910": 8}
    assert "resources" not in replicas["Scheduler"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["labels"] == {"framework": "mindspore", "ring-controller.atlas": "ascend-910b"}
    assert job["spec"]["schedulerName"] == "volcano"
    script = (Path(plan.run_dir) / "launch_k8s.sh").read_text()
    assert '--worker_num="$MS_WORKER_NUM"' in script and '--master_addr="$MS_SCHED_HOST"' in script
    assert subprocess.run(["bash", "-n", str(Path(plan.run_dir) / "launch_k8s.sh")]).returncode == 0


def test_names_become_dns_1123_and_hostile_values_cannot_change_the_structure(tmp_path):
    hostile = "Ex: {a}\n'b\" – 漢 ]]\n- injected: true"
    exp, plan, job, path = written(tmp_path, ["hardware=atlas_800t_a2", "parallel=dp8"], "run")
    exp.experiment_name = hostile
    exp.launch.k8s.queue = "q: {x}\n- y"
    exp.launch.k8s.env = {"TRAIN_DATA": "/data/$(touch PWNED)\n- z: 1"}
    text = Path(plan.run_dir) / "ascendjob.yaml"
    from qwen15_exp.launch.k8s import dump
    again = yaml.safe_load(dump([manifest(plan, exp)]))
    assert again == manifest(plan, exp)                                 # parsed back: the same data
    assert again["metadata"]["annotations"]["qwen15-exp/experiment"] == hostile
    assert again["spec"]["runPolicy"]["schedulingPolicy"]["queue"] == "q: {x}\n- y"
    assert set(again) == {"apiVersion", "kind", "metadata", "spec"} and "injected" not in json.dumps(list(again))
    import re
    name = job_name(exp, plan.run_dir)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name) and name.startswith("qwen15-ex-a-b-")
    env = again["spec"]["replicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "TRAIN_DATA", "value": "/data/$(touch PWNED)\n- z: 1"} in env
    assert dns_name("My Exp_v2") == "my-exp-v2" and dns_name("---") == "qwen15-exp" and len(dns_name("a" * 99)) == 63
    assert text.is_file()


def test_layouts_and_knobs_the_operator_would_refuse_are_said_before_writing(tmp_path):
    r = run_cli(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2", "launch.k8s.enabled=true"], tmp_path)
    assert r.returncode == 2 and "launch.k8s.image is empty" in r.stderr
    r = run_cli(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2", *K8S, "launch.k8s.namespace=My_NS"], tmp_path)
    assert r.returncode == 2 and "not a DNS-1123 name" in r.stderr
    assert not list(tmp_path.rglob("ascendjob.yaml"))


def test_a_sweep_writes_one_manifest_per_job_and_an_index_that_submits_them(tmp_path):
    r = run_cli(["-m", "model=7b", "phase.seed=1,2", "hardware=atlas_800t_a2", "parallel=dp8", *K8S], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    manifests = sorted(sweep.glob("*/ascendjob.yaml"))
    assert len(manifests) == 2
    names = [yaml.safe_load(m.read_text())["metadata"]["name"] for m in manifests]
    assert len(set(names)) == 2                                        # two jobs, two AscendJob names
    index = (sweep / "submit_ascendjobs.sh").read_text()
    assert all(f"kubectl apply -f {m}" in index for m in manifests)
    assert subprocess.run(["bash", "-n", str(sweep / "submit_ascendjobs.sh")]).returncode == 0


def operator_env(role: str, rank: int, port: int, workers: int, per_pod: int) -> dict:
    """What ascend-operator's setMindSporeEnv puts in a pod's `ascend` container (pkg/controllers/v1/env.go),
    with the scheduler's address as this machine's."""
    return {"MS_ROLE": role, "MS_SCHED_HOST": "127.0.0.1", "MS_SCHED_PORT": str(port), "MS_NODE_RANK": str(rank),
            "MS_LOCAL_WORKER": str(per_pod), "MS_WORKER_NUM": str(workers * per_pod), "MS_SERVER_NUM": "0",
            "NPU_POD": "false", "REPLICA_TYPE": role.replace("MS_SCHED", "scheduler").replace("MS_WORKER", "worker")}


@pytest.mark.slow
def test_the_pods_started_as_the_operator_starts_them_train_as_dp2_does(tmp_path):
    steps = 4
    common = ["hardware=cpu", "parallel=dp2", f"phase.max_steps={steps}"]
    reference = run_cli(common, tmp_path / "ref")                      # also prepares the dataset
    assert reference.returncode == 0, reference.stderr[-2000:]
    ref_dir = only_run_dir(tmp_path / "ref")
    dataset = yaml.safe_load((ref_dir / "mindformers.yaml").read_text())["train_dataset"]["data_loader"]["dataset_dir"]
    plan = run_cli([*common, "parallel.nodes=2", "launch.mode=plan", *K8S,
                    f"+launch.k8s.env.TRAIN_DATA={dataset}"], tmp_path / "k8s")
    assert plan.returncode == 0, plan.stderr[-2000:]
    run_dir = only_run_dir(tmp_path / "k8s")
    job = yaml.safe_load((run_dir / "ascendjob.yaml").read_text())
    check_against_the_schemas(job)
    from qwen15_exp.launch.msrun import free_port
    port = free_port()
    procs = []
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"     # python and msrun of the image
    for role, replica in (("MS_SCHED", "Scheduler"), ("MS_WORKER", "Worker"), ("MS_WORKER", "Worker")):
        rank = sum(1 for r, _ in procs if r == role)
        container = job["spec"]["replicaSpecs"][replica]["template"]["spec"]["containers"][0]
        env = {**os.environ, "PATH": path, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e},
               **operator_env(role, rank, port, workers=2, per_pod=1)}
        log = open(tmp_path / f"{replica}{rank}.log", "w")
        p = subprocess.Popen(container["command"] + container["args"], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append((role, p))
    try:
        codes = [p.wait(timeout=600) for _, p in procs]
    finally:
        for _, p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = "".join((tmp_path / f).read_text()[-1500:] for f in ("Scheduler0.log", "Worker0.log", "Worker1.log"))
    assert codes == [0, 0, 0], logs
    ours = [read_json(run_dir / f"rank_{r}.json")["losses"] for r in (0, 1)]
    theirs = [read_json(ref_dir / f"rank_{r}.json")["losses"] for r in (0, 1)]
    assert [len(x) for x in ours] == [steps, steps]
    import numpy as np
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    left = [p for p in psutil.process_iter(["environ"]) if (p.info["environ"] or {}).get("MS_SCHED_PORT") == str(port)]
    assert not left, f"left running: {[p.pid for p in left]}"


FAKE_WORKER = """#!/usr/bin/env bash
# the image's python: modules run for real; `python worker.py` records what the worker would see
if [ "$1" = -m ]; then exec "$REAL_PYTHON" "$@"; fi
"$REAL_PYTHON" -c 'import json, os
e = os.environ
json.dump({k: e.get(k) for k in ("RANK_ID", "DEVICE_ID", "RANK_SIZE", "RANK_TABLE_FILE", "MS_ROLE", "MS_SCHED_HOST",
           "QWEN15_EXP_SERVER_ID")}, open(os.path.join(e["SEEN"], "rank_" + e["RANK_ID"] + ".json"), "w"))'
"""


def operator_table(pod_ips: list[str], per_pod: int, status: str = "completed") -> dict:
    """hccl.json as the ascend-operator writes it (pkg/ranktable/common: Server, Device; rank_id = pod rank index
    x devices + index; physical device ids as the device plugin gave them)."""
    return {"status": status, "version": "1.0", "server_count": str(len(pod_ips)), "server_list": [
        {"device": [{"device_id": str(4 + d), "device_ip": f"192.168.{d}.{i + 1}", "rank_id": str(i * per_pod + d)}
                    for d in range(per_pod)],
         "server_id": f"10.0.0.{i + 1}", "host_ip": f"10.0.0.{i + 1}", "container_ip": ip}
        for i, ip in enumerate(pod_ips)]}


def test_a_rank_table_job_mounts_the_operators_table_and_starts_a_worker_per_npu(tmp_path):
    import threading
    import time
    exp = make_experiment(["model=7b", "parallel=dp4mp4", "hardware=atlas_800t_a2", *K8S,
                           "launch.k8s.rank_table=true"])
    plan = make_plan(exp, tmp_path / "run")
    docs = list(yaml.safe_load_all(write_k8s_files(plan, exp).read_text()))
    cm, job = docs
    name = job["metadata"]["name"]
    check_against_the_schemas(job)
    import kubernetes_validate
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    assert cm["metadata"]["name"] == f"rings-config-{name}" and json.loads(cm["data"]["hccl.json"]) == {
        "status": "initializing"}
    worker = job["spec"]["replicaSpecs"]["Worker"]["template"]["spec"]
    assert {"name": "ranktable", "configMap": {"name": f"rings-config-{name}"}} in worker["volumes"]
    assert {"name": "ranktable", "mountPath": "/user/serverid/devindex/config"} in worker["containers"][0]["volumeMounts"]

    # pod 1 of 2 as the operator starts it; its table is "initializing" until the operator completes it
    seen, table = tmp_path / "seen", tmp_path / "hccl.json"
    seen.mkdir()
    table.write_text(json.dumps({"status": "initializing"}))
    fake = tmp_path / "python"
    fake.write_text(FAKE_WORKER)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "SEEN": str(seen),
           "RANK_TABLE_FILE": str(table), "POD_IP": "172.16.0.9",
           **operator_env("MS_WORKER", 1, 2222, workers=2, per_pod=8)}
    script = Path(plan.run_dir) / "launch_k8s.sh"
    complete = threading.Timer(3, lambda: table.write_text(json.dumps(operator_table(["172.16.0.8", "172.16.0.9"], 8))))
    complete.start()
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 >= 3                                  # it waited for "completed"
    ranks = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in seen.glob("rank_*.json")}
    assert sorted(ranks) == list(range(8, 16))                         # the second pod's ranks
    assert [ranks[r]["DEVICE_ID"] for r in range(8, 16)] == [str(d) for d in range(8)]   # as the container sees them
    assert {(w["RANK_SIZE"], w["RANK_TABLE_FILE"], w["MS_ROLE"], w["MS_SCHED_HOST"], w["QWEN15_EXP_SERVER_ID"])
            for w in ranks.values()} == {("16", str(table), None, None, "172.16.0.9")}

    # the Scheduler pod has nothing to do; a table that disagrees with the plan, or never completes: exit 2
    r = subprocess.run(["bash", str(script)], env={**env, **operator_env("MS_SCHED", 0, 2222, 2, 8)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    table.write_text(json.dumps(operator_table(["172.16.0.8", "172.16.0.9"], 4)))
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "disagrees with the plan" in r.stderr and "4 devices, the layout 8" in r.stderr
    table.write_text(json.dumps({"status": "initializing"}))
    r = subprocess.run([sys.executable, "-m", "qwen15_exp.launch.rank_table", "--pod_table", str(table),
                        "--pod_ip", "172.16.0.9", "--nodes", "2", "--devices_per_node", "8", "--wait", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "still 'initializing' after 1 s" in r.stderr and "rings-config-" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_rank_table_job_is_said_in_the_summary_and_refused_where_hccl_cannot_run(tmp_path):
    r = run_cli(["model=7b", "parallel=dp4mp4", "hardware=atlas_800t_a2", *K8S, "launch.k8s.rank_table=true"],
                tmp_path / "a")
    assert r.returncode == 0 and "the operator's HCCL rank table" in r.stdout, r.stderr[-2000:]
    assert read_json(only_run_dir(tmp_path / "a") / "result.json")["k8s"]["networking"] == "rank_table"
    r = run_cli(["hardware=cpu", "parallel=dp2", "launch.mode=plan", *K8S, "launch.k8s.rank_table=true"], tmp_path / "b")
    assert r.returncode == 2 and "HCCL rank tables are for Ascend NPUs" in r.stderr
