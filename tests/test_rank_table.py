"""launch.rank_table: per-server scripts that start one worker per device with RANK_TABLE_FILE, RANK_ID,
DEVICE_ID and RANK_SIZE, checked against a fake interpreter; tables that disagree with the layout exit 2; the
table builder reads hccn_tool as MindFormers' hccl_tools.py does."""
import json
import os
import subprocess
import sys

from helpers import only_run_dir, read_json, run_cli

FAKE_HCCN = """#!/usr/bin/env bash
# hccn_tool -i <id> -ip -g
echo "ipaddr:192.$(( $2 % 4 + 1 )).27.$(( 6 + $2 / 4 ))"
echo "netmask:255.255.255.0"
"""

FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for `python worker.py ...`: records what the worker would see (values may hold any character)
"$REAL_PYTHON" -c 'import json, os, sys
e = os.environ
json.dump({"rank": e["RANK_ID"], "device": e["DEVICE_ID"], "size": e["RANK_SIZE"], "table": e["RANK_TABLE_FILE"],
           "server": e["QWEN15_EXP_SERVER_ID"], "args": " ".join(sys.argv[1:])},
          open(os.path.join(e["SEEN"], "rank_" + e["RANK_ID"] + ".json"), "w"))' "$@"
[ "$RANK_ID" = "$FAIL_RANK" ] && exit 3
exit 0
"""


def tool(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def two_server_table(tmp_path):
    hccn = tool(tmp_path, "hccn_tool", FAKE_HCCN)
    for i, ip in enumerate(["10.0.0.1", "10.0.0.2"]):
        r = subprocess.run([sys.executable, "-m", "qwen15_exp.launch.rank_table", "--device_num", "[0,8)",
                            "--server_ip", ip, "--hccn_tool", str(hccn), "--output", str(tmp_path / f"s{i}.json")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "qwen15_exp.launch.rank_table", "--merge", str(tmp_path / "s0.json"),
                        str(tmp_path / "s1.json"), "--output", str(tmp_path / "hccl.json")], capture_output=True, text=True)
    assert r.returncode == 0 and "2 server(s), 16 devices" in r.stdout
    return tmp_path / "hccl.json"


def test_the_builder_writes_hccl_tools_format(tmp_path):
    table = json.loads(two_server_table(tmp_path).read_text())
    assert table["server_count"] == "2" and table["status"] == "completed"
    s1 = table["server_list"][1]
    assert s1["server_id"] == "10.0.0.2"
    assert s1["device"][3] == {"device_id": "3", "device_ip": "192.4.27.6", "rank_id": "11"}


def test_rank_table_scripts_start_one_worker_per_device(tmp_path):
    table = two_server_table(tmp_path)
    r = run_cli(["model=7b", "parallel=dp4mp4", "hardware=atlas_800t_a2", f"launch.rank_table={table}",
                 "phase.max_steps=10"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_dir = only_run_dir(tmp_path)
    assert read_json(run_dir / "result.json")["status"] == "planned"
    scripts = sorted(run_dir.glob("launch_node*.sh"))
    assert [s.name for s in scripts] == ["launch_node0.sh", "launch_node1.sh"]
    fake = tool(tmp_path, "python", FAKE_PYTHON)
    seen = tmp_path / "seen"
    seen.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "SEEN": str(seen), "FAIL_RANK": "none", "REAL_PYTHON": sys.executable}
    for s in scripts:
        p = subprocess.run(["bash", str(s)], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
    records = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in seen.glob("rank_*.json")}
    assert sorted(records) == list(range(16))
    assert {records[r]["device"] for r in range(8, 16)} == {str(d) for d in range(8)}
    assert all(rec["size"] == "16" and rec["table"] == str(table) for rec in records.values())
    assert all(rec["args"].startswith("worker.py --config mindformers.yaml") for rec in records.values())
    assert (run_dir / "rank_log" / "rank_15.log").exists()
    # a failing worker's status is the node's status
    env["FAIL_RANK"] = "9"
    p = subprocess.run(["bash", str(scripts[1])], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3


def test_a_table_that_disagrees_with_the_layout_is_explained(tmp_path):
    two_server_table(tmp_path)
    one_server = tmp_path / "s0.json"                      # 8 devices, renumbered 0..7
    r = run_cli(["model=7b", "parallel=dp4mp4", "hardware=atlas_800t_a2", f"launch.rank_table={one_server}"],
                tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    out = r.stdout + r.stderr
    assert "launch.rank_table" in out and "the table has 1 servers, the layout 2 nodes" in out
    assert "the table has 8 devices, the layout 16" in out
    broken = tmp_path / "broken.json"
    broken.write_text('{"server_list": [{"device": []}]}')
    r = run_cli(["model=7b", "hardware=atlas_800t_a2", f"launch.rank_table={broken}"], tmp_path)
    assert r.returncode == 2 and "is not an HCCL rank table" in r.stdout + r.stderr


def test_hostile_table_paths_and_server_ids_stay_text(tmp_path):
    """A table path with $( ) and quotes, and a server_id with a newline and a command, reach the workers as
    text; nothing runs."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "a'b $(touch pwned) \"c"                # a folder name holds no slash
    folder.mkdir()
    table = folder / "hccl.json"
    table.write_text(json.dumps({"version": "1.0", "server_count": "1", "status": "completed", "server_list": [
        {"server_id": f"x\ntouch {marker}\n\"; touch {marker}; \"", "device": [
            {"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"}]}]}))
    from helpers import make_experiment
    from qwen15_exp.launch.msrun import write_launch_files
    from qwen15_exp.plan import make_plan
    from qwen15_exp.validate import validate
    exp = make_experiment(["model=7b", "phase=export", "hardware=atlas_800t_a2"])
    exp.launch.rank_table = str(table)              # (Hydra's override grammar would refuse this path)
    assert validate(exp) == []
    (script,) = write_launch_files(make_plan(exp, tmp_path / "run"), exp)
    seen = tmp_path / "seen"
    seen.mkdir()
    fake = tool(tmp_path, "python", FAKE_PYTHON)
    p = subprocess.run(["bash", str(script)], env={**os.environ, "PYTHON": str(fake), "SEEN": str(seen),
                                                   "FAIL_RANK": "none", "REAL_PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    record = json.loads((seen / "rank_0.json").read_text())
    assert record["table"] == str(table) and record["server"] == f"x\ntouch {marker}\n\"; touch {marker}; \""
    assert not marker.exists() and not list(tmp_path.rglob("pwned"))


def test_every_lie_of_a_rank_table_is_listed_at_once(tmp_path):
    """server_count, device count, a repeated device_id and rank_ids with a gap: four lies in one report."""
    table = tmp_path / "lies.json"
    table.write_text(json.dumps({"version": "1.0", "server_count": "3", "status": "completed", "server_list": [
        {"server_id": "10.0.0.1", "device": [{"device_id": "0", "device_ip": "1.1.1.1", "rank_id": "0"},
                                             {"device_id": "0", "device_ip": "1.1.1.2", "rank_id": "5"}]}]}))
    r = run_cli(["model=7b", "parallel=dp8", "hardware=atlas_800t_a2", f"launch.rank_table={table}"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for lie in ("server_count says 3 but server_list holds 1", "has 2 devices, the layout 8 per node",
                "lists a device_id twice", "rank_ids must be 0..1"):
        assert lie in r.stderr, lie
