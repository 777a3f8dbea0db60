"""Kubernetes: a plan as an AscendJob of MindCluster's ascend-operator (apiVersion mindxdl.gitee.com/v1) on Volcano.

One Scheduler replica and one Worker replica per node, as the operator's MindSpore samples
(mindcluster-deploy, samples/train/basic-training/without-ranktable/mindspore/*acjob*.yaml). The operator
injects MindSpore's dynamic-networking variables into the container named `ascend` (ascend-operator
pkg/controllers/v1/env.go, setMindSporeEnv): MS_ROLE (MS_SCHED / MS_WORKER), MS_SCHED_HOST (the scheduler's
address), MS_SCHED_PORT (the `ascendjob-port`), MS_NODE_RANK (the pod's index among its replica type),
MS_LOCAL_WORKER (NPUs requested per Worker pod), MS_WORKER_NUM (that x Worker replicas), MS_SERVER_NUM=0.

With launch.k8s.rank_table the job uses an HCCL rank table instead: the manifest also holds the ConfigMap
`rings-config-<job>` ({"status": "initializing"}), which the operator fills with hccl.json once every Worker
pod has its NPUs (ascend-operator pkg/controllers/v1/pod.go, writeRanktableToCm); the Worker pods mount it at
/user/serverid/devindex/config as the samples do, wait for "completed", and start one worker per NPU with
RANK_TABLE_FILE / RANK_ID / DEVICE_ID / RANK_SIZE, as the rank-table node scripts do. The Scheduler replica,
which the operator requires of a MindSpore job of more than one NPU, then has nothing to do and exits 0.

The manifest is data: built as dicts and written by a YAML dumper, so no name or value can change its
structure. The container runs `bash <run dir>/launch_k8s.sh`, written like the node scripts (every value
shell-quoted): the Scheduler pod starts MindSpore's scheduler (worker.py with MS_ROLE=MS_SCHED, as msrun
would), a Worker pod starts msrun with the operator's numbers in place of MASTER_ADDR / node rank.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from qwen15_exp.errors import UserError

API_VERSION, KIND = "mindxdl.gitee.com/v1", "AscendJob"
CONTAINER, PORT_NAME = "ascend", "ascendjob-port"     # names the operator looks for: "do not modify"
SCRIPT, MANIFEST = "launch_k8s.sh", "ascendjob.yaml"
# the rank table's ConfigMap (prefix fixed by the operator), key, and where the samples mount it
TABLE_CONFIGMAP_PREFIX, TABLE_KEY, TABLE_DIR = "rings-config-", "hccl.json", "/user/serverid/devindex/config"
TABLE_VOLUME = "ranktable"                             # the name the operator looks for (hasRankTableVolume)
MAX_NAME = 63                                          # a label value and DNS-1123 label: the pods' names derive


def dns_name(text: str) -> str:
    """A DNS-1123 label from any text: lower case, [a-z0-9-], starting and ending with a letter or digit, at
    most 63 characters; every other run of characters becomes one '-' ("My Exp_v2" -> "my-exp-v2")."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:MAX_NAME].strip("-")
    return name or "qwen15-exp"


def job_name(exp, run_dir) -> str:
    """launch.k8s.name, or one made from the experiment and a short hash of the run dir: every run of a sweep
    (over seeds too) its own AscendJob."""
    import hashlib
    if exp.launch.k8s.name:
        return dns_name(exp.launch.k8s.name)
    tag = hashlib.sha1(str(run_dir).encode()).hexdigest()[:6]
    return f"{dns_name(f'qwen15-{exp.experiment_name}-{exp.model.name}-{exp.phase.name}')[:MAX_NAME - 7]}-{tag}"


def k8s_problems(exp, layout) -> list[str]:
    """What the operator or the cluster would refuse, said before anything is written."""
    k, hw = exp.launch.k8s, exp.hardware
    out = []
    if not k.image:
        out.append("launch.k8s.image is empty: name the image with MindSpore, MindFormers, CANN and qwen15_exp")
    if layout.devices_here > hw.devices_per_node:
        out.append(f"{layout.devices_here} devices per pod, but {hw.name} has {hw.devices_per_node} per node")
    if layout.devices != layout.devices_here * layout.nodes:
        out.append(f"{layout.devices} devices do not split into {layout.nodes} pods of {layout.devices_here}")
    if dns_name(k.namespace) != k.namespace:
        out.append(f"launch.k8s.namespace={k.namespace!r} is not a DNS-1123 name (e.g. {dns_name(k.namespace)!r})")
    from qwen15_exp.launch.script import ENV_KEY
    bad = [key for key in k.env if not ENV_KEY.fullmatch(key)]
    if bad:
        out.append(f"launch.k8s.env names {bad} are not environment variable names")
    if exp.launch.rank_table:
        out.append("launch.rank_table with launch.k8s: the operator writes the job's rank table itself; "
                   "leave launch.rank_table empty and set launch.k8s.rank_table=true")
    if k.rank_table and hw.device_target != "Ascend":
        out.append(f"launch.k8s.rank_table with hardware={hw.name}: HCCL rank tables are for Ascend NPUs; "
                   "leave it false (msrun's dynamic networking)")
    for v in k.volumes:
        if bool(v.host_path) == bool(v.claim):
            out.append(f"launch.k8s.volumes {v.name!r}: give host_path or claim (one of them)")
        if not (v.mount_path or v.host_path).startswith("/"):
            out.append(f"launch.k8s.volumes {v.name!r}: mount_path must be absolute")
    return out


def volumes_of(exp, run_dir: Path) -> list:
    """The user's volumes, else the output root (or the run dir's parent) mounted from the node at the same path,
    so the run dir is the same path in every pod (volume_specs adds the driver and /dev/shm)."""
    from qwen15_exp.schema import K8sVolume
    if exp.launch.k8s.volumes:
        return list(exp.launch.k8s.volumes)
    from qwen15_exp.paths import output_root
    root = str(output_root())
    shared = root if str(run_dir).startswith(root + "/") else str(run_dir.parent)
    return [K8sVolume(name="outputs", host_path=shared)]


def volume_specs(volumes: list) -> tuple[list, list]:
    mounts = [{"name": dns_name(v.name), "mountPath": v.mount_path or v.host_path} for v in volumes]
    specs = [{"name": dns_name(v.name), **({"hostPath": {"path": v.host_path}} if v.host_path else
                                           {"persistentVolumeClaim": {"claimName": v.claim}})} for v in volumes]
    mounts += [{"name": "ascend-driver", "mountPath": "/usr/local/Ascend/driver"},
               {"name": "dshm", "mountPath": "/dev/shm"}]
    specs += [{"name": "ascend-driver", "hostPath": {"path": "/usr/local/Ascend/driver"}},
              {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    return mounts, specs


def table_configmap(exp, name: str) -> dict:
    """The ConfigMap the operator fills with the job's hccl.json (as the samples write it)."""
    k = exp.launch.k8s
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": TABLE_CONFIGMAP_PREFIX + name, "namespace": k.namespace,
                         "labels": {"ring-controller.atlas": k.ring_controller}},
            "data": {TABLE_KEY: '{\n    "status": "initializing"\n}\n'}}


def pod_template(exp, run_dir: Path, role: str, npus: int, name: str) -> dict:
    k = exp.launch.k8s
    mounts, specs = volume_specs(volumes_of(exp, run_dir))
    if k.rank_table and role == "Worker":
        mounts.append({"name": TABLE_VOLUME, "mountPath": TABLE_DIR})
        specs.append({"name": TABLE_VOLUME, "configMap": {"name": TABLE_CONFIGMAP_PREFIX + name}})
    container = {
        "name": CONTAINER, "image": k.image, "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/bash", "-c"],
        # the only value in the shell: the script's path, quoted; everything else is in the script
        "args": [f"bash {shlex.quote(str(run_dir / SCRIPT))}"],
        "ports": [{"containerPort": int(k.port), "name": PORT_NAME}],
        "volumeMounts": mounts,
    }
    env = [{"name": key, "value": str(value)} for key, value in sorted(k.env.items())]
    if npus:
        container["resources"] = {"limits": {k.npu_resource: npus}, "requests": {k.npu_resource: npus}}
        # the NPUs Volcano gave this pod, for ascend-docker-runtime (the samples' whole-card scheduling)
        env.append({"name": "ASCEND_VISIBLE_DEVICES", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{k.npu_resource}']"}}})
    if k.rank_table and role == "Worker":      # the pod finds its server in the table by its address
        env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    if env:
        container["env"] = env
    spec = {"automountServiceAccountToken": False, "containers": [container], "volumes": specs}
    if role == "Worker":                  # one Worker per node
        spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchExpressions": [
                {"key": "job-name", "operator": "In", "values": [name]},
                {"key": "replica-type", "operator": "In", "values": ["worker"]}]},
            "topologyKey": "kubernetes.io/hostname"}]}}
    return {"metadata": {"labels": {"ring-controller.atlas": k.ring_controller}}, "spec": spec}


def manifest(plan, exp) -> dict:
    """The AscendJob of the plan, as data."""
    L, k, run_dir = plan.layout, exp.launch.k8s, Path(plan.run_dir)
    name = job_name(exp, run_dir)
    replicas = {
        "Scheduler": {"replicas": 1, "restartPolicy": "Never",
                      "template": pod_template(exp, run_dir, "Scheduler", 0, name)},
        "Worker": {"replicas": int(L.nodes), "restartPolicy": "Never",
                   "template": pod_template(exp, run_dir, "Worker", int(L.devices_here), name)},
    }
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": name, "namespace": k.namespace,
                     "labels": {"framework": "mindspore", "ring-controller.atlas": k.ring_controller},
                     # what the name was made from (names are sanitised to DNS-1123)
                     "annotations": {"qwen15-exp/experiment": exp.experiment_name, "qwen15-exp/run-dir": str(run_dir),
                                     "qwen15-exp/layout": L.name}},
        "spec": {"schedulerName": "volcano",
                 "runPolicy": {"schedulingPolicy": {"minAvailable": 1 + int(L.nodes), "queue": k.queue}},
                 "successPolicy": "AllWorkers", "replicaSpecs": replicas},
    }


def documents(plan, exp) -> list[dict]:
    """What ascendjob.yaml holds: the rank table's ConfigMap first (it must exist when the pods mount it), then
    the AscendJob."""
    job = manifest(plan, exp)
    return ([table_configmap(exp, job["metadata"]["name"])] if exp.launch.k8s.rank_table else []) + [job]


def dump(docs: list[dict]) -> str:
    import yaml
    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True, width=120)


def pod_script(plan, exp) -> str:
    """launch_k8s.sh: what each pod runs, by the role the operator gave it."""
    from qwen15_exp.launch.msrun import NODE_LOG_PREFIX
    from qwen15_exp.launch.script import WORKER_OPTIONS, export_lines, node_setup_lines
    L = plan.layout
    bind = " --bind_core=True" if exp.launch.bind_core and exp.hardware.device_target == "Ascend" else ""
    lines = [
        "#!/usr/bin/env bash",
        f"# A pod of AscendJob {job_name(exp, plan.run_dir)}: {int(L.nodes)} Worker pod(s) of {int(L.devices_here)} devices and a "
        "Scheduler pod. The ascend-operator sets MS_ROLE, MS_SCHED_HOST, MS_SCHED_PORT, MS_NODE_RANK, "
        "MS_LOCAL_WORKER, MS_WORKER_NUM.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
    ]
    if exp.launch.k8s.rank_table:
        return "\n".join(lines + rank_table_lines(plan, exp)) + "\n"
    lines += export_lines(plan, exp, QWEN15_EXP_NODE_RANK="0")
    lines += node_setup_lines(plan, exp)
    lines += [
        ': "${MS_ROLE:?not started by the ascend-operator (MS_ROLE is unset)}"',
        'if [ "$MS_ROLE" = MS_SCHED ]; then echo "scheduler on $MS_SCHED_HOST:$MS_SCHED_PORT for $MS_WORKER_NUM '
        'workers"; exec "${PYTHON:-python}" worker.py --config mindformers.yaml; fi',
        f'if [ "$MS_WORKER_NUM" != {int(L.devices)} ] || [ "$MS_LOCAL_WORKER" != {int(L.devices_here)} ]; then '
        f'echo "error: the job gives $MS_WORKER_NUM workers, $MS_LOCAL_WORKER per pod; the plan is {int(L.devices)}, '
        f'{int(L.devices_here)} per pod ({L.name}): plan again rather than edit the manifest" >&2; exit 2; fi',
        'export QWEN15_EXP_NODE_RANK="$MS_NODE_RANK"',
        # the Scheduler pod runs the scheduler: msrun must not start one of its own, even where the scheduler's
        # address is local (one machine standing in for the cluster)
        "export QWEN15_EXP_SCHEDULER_ELSEWHERE=1",
        f'echo "worker pod $MS_NODE_RANK: msrun, scheduler $MS_SCHED_HOST:$MS_SCHED_PORT, logs in '
        f'$PWD/{NODE_LOG_PREFIX}$MS_NODE_RANK"',
        f'exec msrun --worker_num="$MS_WORKER_NUM" --local_worker_num="$MS_LOCAL_WORKER" '
        f'--master_addr="$MS_SCHED_HOST" --master_port="$MS_SCHED_PORT" --node_rank="$MS_NODE_RANK" '
        f'--log_dir="{NODE_LOG_PREFIX}$MS_NODE_RANK" --join=True '
        f'--cluster_time_out={int(exp.launch.cluster_time_out)}{bind} worker.py --config mindformers.yaml '
        f'{WORKER_OPTIONS}',
    ]
    return "\n".join(lines) + "\n"


def rank_table_lines(plan, exp) -> list[str]:
    """A Worker pod of a rank-table job: wait for the operator's table, then a worker per NPU with its
    RANK_ID / DEVICE_ID (the rank-table node script's supervision: the first failure stops the others)."""
    from qwen15_exp.launch.rank_table import supervise_lines
    from qwen15_exp.launch.script import WORKER_OPTIONS, export_lines, node_setup_lines
    L = plan.layout
    lines = export_lines(plan, exp) + node_setup_lines(plan, exp)
    lines += [
        ': "${MS_ROLE:?not started by the ascend-operator (MS_ROLE is unset)}"',
        'if [ "$MS_ROLE" = MS_SCHED ]; then echo "a rank-table job: HCCL needs no scheduler, this pod has nothing '
        'to do"; exit 0; fi',
        # MindSpore would take these for msrun's dynamic networking instead of the rank table
        "unset MS_ROLE MS_SCHED_HOST MS_SCHED_PORT MS_NODE_RANK MS_LOCAL_WORKER MS_WORKER_NUM MS_SERVER_NUM",
        f"MOUNTED_RANK_TABLE={shlex.quote(TABLE_DIR + '/' + TABLE_KEY)}",
        'export RANK_TABLE_FILE="${RANK_TABLE_FILE:-$MOUNTED_RANK_TABLE}"',
        f"export RANK_SIZE={int(L.devices)}",
        'PYTHON="${PYTHON:-python}"',
        f'devices="$("$PYTHON" -m qwen15_exp.launch.rank_table --pod_table "$RANK_TABLE_FILE" --pod_ip "$POD_IP" '
        f'--nodes {int(L.nodes)} --devices_per_node {int(L.devices_here)} '
        f'--wait {int(exp.launch.cluster_time_out)})" || exit $?',
        'export QWEN15_EXP_SERVER_ID="$POD_IP"',
        "mkdir -p rank_log", "pids=()", "trap 'kill -TERM \"${pids[@]}\" 2>/dev/null' INT TERM",
        'while read -r rank device; do',
        f'  RANK_ID="$rank" DEVICE_ID="$device" "$PYTHON" worker.py --config mindformers.yaml {WORKER_OPTIONS} '
        '> "rank_log/rank_$rank.log" 2>&1 &',
        '  pids+=($!)',
        'done <<< "$devices"',
        'echo "worker pod $POD_IP: ${#pids[@]} workers started, logs in $PWD/rank_log"',
        "set +e",
    ]
    return lines + supervise_lines()


def write_k8s_files(plan, exp) -> Path:
    """ascendjob.yaml and launch_k8s.sh into the run dir; a layout the operator would refuse is a UserError."""
    from qwen15_exp.atomic import write_text
    problems = k8s_problems(exp, plan.layout)
    if problems:
        raise UserError("launch.k8s: " + "; ".join(problems))
    run_dir = Path(plan.run_dir)
    write_text(run_dir / SCRIPT, pod_script(plan, exp), mode=0o755)
    return write_text(run_dir / MANIFEST, dump(documents(plan, exp)))


def submit_lines(path: str, exp, run_dir) -> list[str]:
    name, ns = job_name(exp, run_dir), shlex.quote(exp.launch.k8s.namespace)
    return [f"kubectl apply -f {shlex.quote(path)}",
            f"kubectl get ascendjob {name} -n {ns}; kubectl get pods -n {ns} -l job-name={name} -w",
            f"kubectl logs -n {ns} -f {name}-worker-0"]
