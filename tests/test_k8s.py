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
    again = yaml.safe_load(dump(manifest(plan, exp)))
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
