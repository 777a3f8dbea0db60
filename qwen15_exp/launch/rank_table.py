"""Launch from an HCCL rank table (hccl.json), for clusters that hand one out (ModelArts, older Ascend setups)
instead of running msrun: one process per device, each told RANK_TABLE_FILE, RANK_ID, DEVICE_ID and RANK_SIZE.

The table (MindFormers' hccl_tools.py writes it; ModelArts puts it at /user/config/jobstart_hccl.json):
    {"version": "1.0", "server_count": "2", "status": "completed",
     "server_list": [{"server_id": "10.0.0.1", "host_nic_ip": "reserve",
                      "device": [{"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"}, ...]}, ...]}
It is checked against the layout (servers = nodes, devices per server, ranks 0..n-1) before anything is
written. `python -m qwen15_exp.launch.rank_table` builds one from `hccn_tool` as hccl_tools.py does.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qwen15_exp.errors import UserError
from qwen15_exp.launch.script import WORKER_OPTIONS, export_lines, node_setup_lines


@dataclass(frozen=True)
class Device:
    device_id: int
    device_ip: str
    rank_id: int


@dataclass(frozen=True)
class Server:
    server_id: str
    devices: tuple


def read_rank_table(path: str) -> list[Server]:
    """The servers of a rank table, devices in rank order; a malformed table is a UserError naming the field."""
    servers, declared = read_table(path)
    if declared != str(len(servers)):
        raise UserError(count_lie(path, declared, len(servers)))
    return servers


def count_lie(path: str, declared: str, held: int) -> str:
    return f"launch.rank_table={path}: server_count says {declared} but server_list holds {held} servers"


def read_table(path: str) -> tuple[list[Server], str]:
    """The servers and the server_count the table declares (validate lists every lie at once)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such rank table file; give the hccl.json of the job (or of each server to "
                        "--merge)")
    try:
        table = json.loads(p.read_text())
        servers = [Server(str(s["server_id"]), tuple(sorted(
            (Device(int(d["device_id"]), str(d.get("device_ip", "")), int(d["rank_id"])) for d in s["device"]),
            key=lambda d: d.rank_id))) for s in table["server_list"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"launch.rank_table={path} is not an HCCL rank table ({type(e).__name__}: {e}); it needs "
                        "server_list[].server_id and server_list[].device[].device_id/rank_id") from None
    return servers, str(table.get("server_count", len(servers)))


def table_problems(servers: list[Server], layout) -> list[str]:
    """How the table disagrees with the layout (empty when it agrees)."""
    out = []
    if len(servers) != layout.nodes:
        out.append(f"the table has {len(servers)} servers, the layout {layout.nodes} nodes ({layout.terms})")
    for s in servers:
        if len(s.devices) != layout.devices_here:
            out.append(f"server {s.server_id} has {len(s.devices)} devices, the layout {layout.devices_here} per node")
        ids = [d.device_id for d in s.devices]
        if len(set(ids)) != len(ids):
            out.append(f"server {s.server_id} lists a device_id twice: {ids}")
    ranks = sorted(d.rank_id for s in servers for d in s.devices)
    if ranks != list(range(len(ranks))):
        out.append(f"rank_ids must be 0..{len(ranks) - 1}, each once; the table has {ranks}")
    if len(ranks) != layout.devices:
        out.append(f"the table has {len(ranks)} devices, the layout {layout.devices}")
    return out


def supervise_lines() -> list[str]:
    """Wait for the workers in `pids`; the first to fail stops the others (they would wait for it in HCCL until
    its timeout); exit with the first failure's status."""
    return ["status=0",
            'while [ "${#pids[@]}" -gt 0 ]; do',
            '  for i in "${!pids[@]}"; do',
            '    pid="${pids[$i]}"',
            '    if kill -0 "$pid" 2>/dev/null; then continue; fi',
            '    rc=0; wait "$pid" || rc=$?; unset "pids[$i]"',
            '    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc',
            '      echo "a worker exited with $rc: stopping the others" >&2',
            '      [ "${#pids[@]}" -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null',
            '    fi',
            '  done',
            '  [ "${#pids[@]}" -gt 0 ] && sleep 1',
            'done',
            'exit "$status"']


def node_script(plan, exp, node_rank: int, servers: list[Server]) -> str:
    """One node's script: a worker per device of that server, each with its rank and device, in the
    background; the script waits for all of them and exits with the first failure's status. A stop signal
    is passed on to every worker (they checkpoint and exit)."""
    q = shlex.quote
    server = servers[node_rank]
    lines = [
        "#!/usr/bin/env bash",
        f"# node {int(node_rank)} of {len(servers)} (rank table): {len(server.devices)} devices here, "
        f"{int(plan.layout.devices)} in all. RANK_TABLE_FILE overrides the planned table; PYTHON the interpreter.",
        "set -uo pipefail",
        'cd "$(dirname "$0")"',
    ]
    lines += export_lines(plan, exp, QWEN15_EXP_SERVER_ID=server.server_id)
    lines += node_setup_lines(plan, exp)
    # the planned path in a quoted assignment: inside "${VAR:-...}" quotes would not quote and $( ) would run
    lines += [f"PLANNED_RANK_TABLE={q(str(Path(exp.launch.rank_table).resolve()))}",
              'export RANK_TABLE_FILE="${RANK_TABLE_FILE:-$PLANNED_RANK_TABLE}"',
              f"export RANK_SIZE={int(plan.layout.devices)}",
              'PYTHON="${PYTHON:-python}"', "mkdir -p rank_log", "pids=()",
              "trap 'kill -TERM \"${pids[@]}\" 2>/dev/null' INT TERM"]
    for d in server.devices:
        lines.append(f'RANK_ID={int(d.rank_id)} DEVICE_ID={int(d.device_id)} "$PYTHON" worker.py --config '
                     f'mindformers.yaml {WORKER_OPTIONS} > rank_log/rank_{int(d.rank_id)}.log 2>&1 &')
        lines.append("pids+=($!)")
    lines.append('echo "node %s: %s workers started, logs in $PWD/rank_log"' % (int(node_rank), len(server.devices)))
    lines += supervise_lines()
    return "\n".join(lines) + "\n"


# ---- in a Worker pod of an AscendJob: the table the ascend-operator writes ----

def wait_for_table(path: str, timeout_s: float, poll_s: float = 2.0) -> dict:
    """The operator's table once its status is "completed" (it starts as {"status": "initializing"} and is
    rewritten when every pod has its devices; the samples' rank_table.sh waits the same way)."""
    import time
    deadline, status = time.monotonic() + timeout_s, "absent"
    while True:
        try:
            table = json.loads(Path(path).read_text())
            status = str(table.get("status", "no status"))
            if status == "completed":
                return table
        except FileNotFoundError:
            status = "absent"
        except ValueError:              # caught between two writes: read it again
            status = "being written"
        if time.monotonic() >= deadline:
            raise UserError(f"{path} is still {status!r} after {timeout_s:.0f} s: the ascend-operator writes it into "
                            "the ConfigMap rings-config-<job> once every Worker pod has its NPUs; check that the "
                            "operator runs and `kubectl get cm rings-config-<job> -o yaml`")
        time.sleep(poll_s)


def pod_devices(table: dict, pod_ip: str, layout) -> list[tuple[int, int]]:
    """(RANK_ID, DEVICE_ID) of this pod's devices: its server is the one whose container_ip is the pod's address
    (the operator's Server.ContainerIP); DEVICE_ID is the device's index in the pod, as ascend-docker-runtime
    numbers the NPUs a container sees (the samples' train_start.sh); RANK_ID the table's rank_id."""
    try:
        servers = [(str(s.get("container_ip", "")), str(s.get("server_id", "")), [int(d["rank_id"]) for d in s["device"]])
                   for s in table["server_list"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the operator's rank table has no server_list[].device[].rank_id ({type(e).__name__}: {e})") \
            from None
    as_servers = [Server(sid or ip, tuple(Device(i, "", r) for i, r in enumerate(ranks))) for ip, sid, ranks in servers]
    problems = table_problems(as_servers, layout)
    if problems:
        raise UserError("the operator's rank table disagrees with the plan: " + "; ".join(problems))
    mine = [ranks for ip, _, ranks in servers if ip == pod_ip]
    if len(mine) != 1:
        raise UserError(f"this pod ({pod_ip}) is {'not' if not mine else 'more than once'} in the operator's rank "
                        f"table (container_ip of its servers: {[ip for ip, _, _ in servers]})")
    return [(rank, index) for index, rank in enumerate(mine[0])]


def pod_main(args) -> int:
    from types import SimpleNamespace
    layout = SimpleNamespace(nodes=args.nodes, devices_here=args.devices_per_node,
                             devices=args.nodes * args.devices_per_node, terms=f"{args.nodes} x {args.devices_per_node}")
    for rank, device in pod_devices(wait_for_table(args.pod_table, args.wait), args.pod_ip, layout):
        print(rank, device)
    return 0


# ---- building a table from hccn_tool, as MindFormers' hccl_tools.py does ----

def parse_device_range(text: str) -> list[int]:
    """"[0,8)" -> [0..7] (hccl_tools.py's --device_num)."""
    m = re.fullmatch(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*\)\s*", text)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--device_num {text!r}: write a half-open range like \"[0,8)\"")
    return list(range(int(m.group(1)), int(m.group(2))))


def device_ip(device_id: int, hccn_tool: str = "hccn_tool") -> str:
    """The device's RoCE address from `hccn_tool -i <id> -ip -g` (a line `ipaddr:<ip>`)."""
    try:
        out = subprocess.run([hccn_tool, "-i", str(device_id), "-ip", "-g"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"{hccn_tool} -i {device_id} -ip -g failed ({e}); run this on the Ascend server, or give "
                        "--hccn_tool the tool's path") from None
    m = re.search(r"ipaddr:\s*([0-9.]+)", out)
    if not m:
        raise UserError(f"{hccn_tool} -i {device_id} -ip -g printed no ipaddr: {out.strip()[:200]!r}")
    return str(ipaddress.ip_address(m.group(1)))


def build_table(server_ip: str, devices: list[int], hccn_tool: str = "hccn_tool") -> dict:
    return {"version": "1.0", "server_count": "1",
            "server_list": [{"server_id": server_ip, "host_nic_ip": "reserve",
                             "device": [{"device_id": str(d), "device_ip": device_ip(d, hccn_tool), "rank_id": str(i)}
                                        for i, d in enumerate(devices)]}],
            "status": "completed"}


def merge_tables(tables: list[dict]) -> dict:
    """Several one-server tables -> one table, ranks renumbered in server order (MindFormers' merge_hccl.py)."""
    servers, rank = [], 0
    for t in tables:
        for s in t["server_list"]:
            devices = []
            for d in s["device"]:
                devices.append({**d, "rank_id": str(rank)})
                rank += 1
            servers.append({**s, "device": devices})
    return {"version": "1.0", "server_count": str(len(servers)), "server_list": servers, "status": "completed"}


def main(argv=None) -> int:
    from qwen15_exp.atomic import write_json
    ap = argparse.ArgumentParser(prog="python -m qwen15_exp.launch.rank_table",
                                 description="Build an HCCL rank table from hccn_tool, or merge per-server tables.")
    ap.add_argument("--device_num", default="[0,8)", help='devices of this server, e.g. "[0,8)"')
    ap.add_argument("--server_ip", help="this server's address (the table's server_id)")
    ap.add_argument("--hccn_tool", default="hccn_tool")
    ap.add_argument("--merge", nargs="+", metavar="TABLE", help="merge these one-server tables instead")
    ap.add_argument("--output", help="the table to write")
    pod = ap.add_argument_group("in a Worker pod of an AscendJob: print `RANK_ID DEVICE_ID` of its devices")
    pod.add_argument("--pod_table", metavar="HCCL_JSON", help="the operator's table, as mounted in the pod")
    pod.add_argument("--pod_ip", help="the pod's address (status.podIP)")
    pod.add_argument("--nodes", type=int, default=1, help="Worker pods of the plan")
    pod.add_argument("--devices_per_node", type=int, default=1)
    pod.add_argument("--wait", type=float, default=600, help="seconds to wait for the table's status completed")
    args = ap.parse_args(argv)
    try:
        if args.pod_table:
            return pod_main(args)
        if not args.output:
            raise UserError("--output is required (the table to write)")
        if args.merge:
            for path in args.merge:              # each must be a table (a UserError naming the file and field)
                read_rank_table(path)
            table = merge_tables([json.loads(Path(p).read_text()) for p in args.merge])
        else:
            if not args.server_ip:
                raise UserError("--server_ip is required to build a table (this server's address)")
            table = build_table(args.server_ip, parse_device_range(args.device_num), args.hccn_tool)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    write_json(args.output, table)
    n = sum(len(s["device"]) for s in table["server_list"])
    print(f"wrote {args.output}: {table['server_count']} server(s), {n} devices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
