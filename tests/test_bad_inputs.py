"""Every bad input is a clear error: exit 2, the file named with what to do, no traceback, nothing
half-written, result.json with status invalid. Weights of another model are named before anything is built.
Files are created with the user's umask."""
import json
import os
import stat
import time

import numpy as np
import pytest

from helpers import make_experiment, read_json, run_cli
from qwen15_exp.weights.shapes import expected_shapes
from qwen15_exp.weights.names import MF_TO_HF, rename
from qwen15_exp.weights.tensors import write_streaming


def hf_folder(folder, model_overrides=("model=tiny",)):
    """A Hugging Face Qwen2 folder with the exact tensor names and shapes of a model (random values)."""
    model = make_experiment(list(model_overrides) + ["hardware=cpu"]).model
    folder.mkdir(parents=True)
    items = [(rename(name, MF_TO_HF), "F32", shape) for name, shape in expected_shapes(model).items()]
    rng = np.random.default_rng(0)
    write_streaming(folder / "model.safetensors", items,
                    lambda n: rng.standard_normal(dict((i[0], i[2]) for i in items)[n]).astype(np.float32) * 0.02)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"],
                                                    "tie_word_embeddings": model.tie_word_embeddings}))
    return folder


def assert_clear_error(r, *needles):
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    for needle in needles:
        assert needle in r.stderr, r.stderr


def invalid_result(tmp_path):
    results = list((tmp_path / "outputs").rglob("result.json"))
    assert len(results) == 1
    result = read_json(results[0])
    assert result["status"] == "invalid" and result["error"]
    return result


@pytest.mark.slow                 # the CLI reads the weights with MindSpore
@pytest.mark.parametrize("name,content", [("garbage.ckpt", b"\x00\x01not a checkpoint" * 100),
                                          ("garbage.safetensors", b"\xff" * 64)])
def test_corrupt_checkpoint_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    r = run_cli([f"phase.load_checkpoint={path}", "hardware=cpu"], tmp_path)
    assert_clear_error(r, str(path), "cannot be read as weights")
    invalid_result(tmp_path)


@pytest.mark.slow                 # the CLI reads the weights with MindSpore
def test_truncated_safetensors_and_hf_folder(tmp_path):
    hf = hf_folder(tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run_cli([f"phase.load_checkpoint={hf}", "hardware=cpu"], tmp_path)
    assert_clear_error(r, "cannot be read")
    assert not list((tmp_path / "cache").rglob("weights/*.safetensors"))        # nothing half-converted
    single = tmp_path / "one.safetensors"
    single.write_bytes(data[: len(data) // 2])
    r = run_cli(["direction=hf2mf", f"input={single}", f"output={tmp_path / 'out.safetensors'}"], tmp_path,
                module="qwen15_exp.convert")
    assert_clear_error(r, str(single))
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow                 # the CLI reads the weights with MindSpore
def test_weights_of_another_model_are_named_before_anything_is_built(tmp_path):
    """The report: chat model=0_5b with a tiny HF folder ended after 28 s in load_param_into_net."""
    hf = hf_folder(tmp_path / "hf")
    t0 = time.time()
    r = run_cli(["model=0_5b", f"phase.load_checkpoint={hf}", "chat.mode=batch", "chat.questions=[hi]"], tmp_path,
                module="qwen15_exp.chat")
    assert_clear_error(r, "does not fit model=0_5b", "looks like model=tiny")
    assert time.time() - t0 < 20
    hf_gqa = hf_folder(tmp_path / "hf_gqa", ("model=tiny", "model.n_kv_heads=2"))
    r = run_cli([f"phase.load_checkpoint={hf_gqa}", "hardware=cpu"], tmp_path)
    assert_clear_error(r, "does not fit model=tiny", "attention.wk.weight")


def test_mf2hf_checks_every_tensor_against_the_model(tmp_path):
    """The report: mf2hf wrote a config.json that disagreed with the tensors beside it."""
    hf = hf_folder(tmp_path / "hf", ("model=tiny", "model.n_kv_heads=2"))
    mf = tmp_path / "mf.safetensors"
    assert run_cli(["direction=hf2mf", f"input={hf}", f"output={mf}", "progress=false"], tmp_path,
                   module="qwen15_exp.convert").returncode == 0
    r = run_cli(["direction=mf2hf", f"input={mf}", f"output={tmp_path / 'back'}", "model=tiny"], tmp_path,
                module="qwen15_exp.convert")
    assert_clear_error(r, "does not fit model=tiny", "model.n_kv_heads")
    assert not (tmp_path / "back").exists()


@pytest.mark.slow
def test_broken_mindrecord(tmp_path):
    r = run_cli(["data=alpaca_sample", "model=tiny", f"output={tmp_path / 'mr'}", "progress=false"], tmp_path,
                module="qwen15_exp.prepare")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "mr" / "train.mindrecord"
    for p in (tmp_path / "mr").iterdir():           # the user's umask (022 here), not MindSpore's 0600
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~0o022, p
    assert stat.S_IMODE((tmp_path / "mr").stat().st_mode) == 0o777 & ~0o022
    broken = tmp_path / "no_db"
    broken.mkdir()
    (broken / "train.mindrecord").write_bytes(data.read_bytes())
    r = run_cli(["data=mindrecord", f"data.input={broken}", "hardware=cpu"], tmp_path)
    assert_clear_error(r, "train.mindrecord.db", "copy both")
    invalid_result(tmp_path)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "train.mindrecord").write_bytes(data.read_bytes()[:1000])
    (truncated / "train.mindrecord.db").write_bytes((tmp_path / "mr" / "train.mindrecord.db").read_bytes())
    (tmp_path / "t2").mkdir()
    r = run_cli(["data=mindrecord", f"data.input={truncated}", "hardware=cpu"], tmp_path / "t2")
    assert_clear_error(r, "cannot be read as MindRecord")


def test_converted_weights_get_the_users_umask(tmp_path):
    hf = hf_folder(tmp_path / "hf")
    old = os.umask(0o002)
    try:
        r = run_cli(["direction=hf2mf", f"input={hf}", f"output={tmp_path / 'w.safetensors'}", "progress=false"],
                    tmp_path, module="qwen15_exp.convert")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o664


@pytest.mark.parametrize("override,needle", [("phase.max_steps=-5", "phase.max_steps"),
                                             ("phase.checkpoint.keep_max=1", "phase.checkpoint.keep_max"),
                                             ("hardware.max_device_memory=lots", "not a memory size")])
def test_bad_numbers_exit_2(tmp_path, override, needle):
    r = run_cli(["hardware=cpu", override], tmp_path)
    assert_clear_error(r, needle)
    invalid_result(tmp_path)


def test_a_run_dir_without_a_checkpoint_as_weights_is_explained(tmp_path):
    """phase.load_checkpoint=<a run dir> takes its newest complete checkpoint, as resume does; a run dir
    without one is an error naming what to give, before anything runs."""
    planned = run_cli(["hardware=cpu", "launch.mode=plan"], tmp_path / "a")
    assert planned.returncode == 0, planned.stderr
    run_dir = next((tmp_path / "a").rglob("plan.json")).parent
    r = run_cli(["hardware=cpu", f"phase.load_checkpoint={run_dir}"], tmp_path / "b")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is a run dir without a complete checkpoint" in r.stderr and f"resume={run_dir}" in r.stderr


def test_rank_table_merge_of_a_missing_or_broken_file_is_explained(tmp_path):
    import subprocess
    import sys
    broken = tmp_path / "s1.json"
    broken.write_text("{not json")
    for args, needle in (([str(tmp_path / "missing.json")], "no such rank table file"),
                         ([str(broken)], "is not an HCCL rank table")):
        r = subprocess.run([sys.executable, "-m", "qwen15_exp.launch.rank_table", "--merge", *args, "--output",
                            str(tmp_path / "out.json")], capture_output=True, text=True)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("override, key", [
    ("phase.lr_schedule.learning_rate=-0.1", "phase.lr_schedule.learning_rate"),
    ("phase.lr_schedule.learning_rate=nan", "phase.lr_schedule.learning_rate"),
    ("phase.lr_schedule.warmup_ratio=1.5", "phase.lr_schedule.warmup_ratio"),
    ("phase.optimizer.weight_decay=-1", "phase.optimizer.weight_decay"),
    ("phase.optimizer.betas=[0.9,1.5]", "phase.optimizer.betas"),
    ("phase.loss_scale.factor=0", "phase.loss_scale.factor"),
    ("phase.loss_scale.value=-1", "phase.loss_scale.value"),
    ("phase.generation.top_p=0", "phase.generation.top_p"),
    ("launch.master_addr='a b;c'", "launch.master_addr"),
    ("launch.slurm.partition='gpu; rm -rf /'", "launch.slurm.partition"),
])
def test_values_that_cannot_be_right_are_refused(override, key):
    """A negative or NaN learning rate trained (loss up, exit 0); a host that is no host, a partition that is no
    name were taken: each is a problem of validate() (the CLI's exit 2: below)."""
    from qwen15_exp.validate import validate
    assert key in [p.key for p in validate(make_experiment(["hardware=cpu", override]))]


def test_a_nan_learning_rate_is_refused_by_the_command(tmp_path):
    r = run_cli(["hardware=cpu", "phase.lr_schedule.learning_rate=nan"], tmp_path)
    assert r.returncode == 2 and "phase.lr_schedule.learning_rate: is nan" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.rglob("mindformers.yaml"))


def test_a_group_choice_no_file_can_be_named_is_explained(tmp_path):
    r = run_cli(["model=" + "a" * 5000], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "choose one of 0_5b" in r.stderr


def test_all_problems_come_at_once(tmp_path):
    """Values, missing files and layout problems in one report (they came in stages, fix one, meet the next)."""
    r = run_cli(["hardware=cpu", "data=alpaca", "data.input=/nonexist", "phase.load_checkpoint=/nonexist",
                 "phase.max_steps=0", "data.seq_length=-5"], tmp_path)
    assert r.returncode == 2 and "4 problems found" in r.stderr
    for key in ("data.seq_length", "phase.max_steps", "data.input", "phase.load_checkpoint"):
        assert key in r.stderr
    r = run_cli(["parallel.pipeline_stage=1000", "parallel.micro_batch_num=0"], tmp_path)
    assert r.returncode == 2 and "pipeline_stage=1000 is more than num_layers" in r.stderr
    assert "parallel.micro_batch_num: is 0" in r.stderr


def test_absurd_sizes_are_answered_at_once(tmp_path):
    """data_parallel=1000000 on a 72B plan wrote 125,000 scripts (519 MB); a tune budget of 10^9 devices searched
    for 105 s. Both are refused before any work, naming the key."""
    r = run_cli(["model=72b", "parallel.data_parallel=1000000"], tmp_path / "plan", timeout=60)
    assert r.returncode == 2 and "launch.max_nodes=1024" in r.stderr
    assert not list((tmp_path / "plan").rglob("launch_node*.sh"))
    assert len(r.stdout.splitlines()) + len(r.stderr.splitlines()) < 20
    r = run_cli(["model=72b", "phase=finetune", "hardware=atlas_800t_a2", "tune.devices=1000000000"],
                tmp_path / "tune", module="qwen15_exp.tune", timeout=60)
    assert r.returncode == 2 and "can use 1,000,000,000 devices" in r.stderr and "at most 640" in r.stderr


def test_weights_folders_that_lie_are_refused(tmp_path):
    """A folder with only a damaged model.safetensors, one with only a malformed config.json, and Hugging Face
    folders whose config.json contradicts the model (a word for a number, another model_type, another depth):
    exit 2 naming the file, before anything is built."""
    only_tensors, only_config = tmp_path / "only_tensors", tmp_path / "only_config"
    only_tensors.mkdir()
    (only_tensors / "model.safetensors").write_bytes(os.urandom(1000))
    only_config.mkdir()
    (only_config / "config.json").write_text('{"hidden_size": ')
    hf = hf_folder(tmp_path / "hf")
    tiny = make_experiment(["model=tiny"]).model
    good = {"model_type": "qwen2", "hidden_size": tiny.hidden_size, "num_hidden_layers": tiny.num_layers,
            "num_attention_heads": tiny.num_heads, "intermediate_size": tiny.intermediate_size,
            "vocab_size": tiny.vocab_size}
    cases = [(only_tensors, "no config.json"), (only_config, "no *.safetensors")]
    for name, change, needle in (("word", {"hidden_size": "sixty-four"}, "hidden_size is 'sixty-four'"),
                                 ("llama", {"model_type": "llama"}, "model_type='llama'"),
                                 ("deeper", {"num_hidden_layers": 3}, "num_hidden_layers 3 (model=tiny: 2)")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(hf / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({**good, **change}))
        cases.append((folder, needle))
    from qwen15_exp.errors import UserError
    from qwen15_exp.weights.check import check_fits
    model = make_experiment(["model=tiny"]).model
    for folder, needle in cases:
        with pytest.raises(UserError) as caught:
            check_fits(str(folder), model)
        assert needle in str(caught.value), (folder, str(caught.value))
    r = run_cli(["hardware=cpu", "launch.mode=plan", f"phase.load_checkpoint={only_tensors}"], tmp_path / "runs")
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_peft_folders_that_lie_are_refused(tmp_path):
    """adapter_config.json saying rank 16 over rank-8 tensors would merge at the wrong scale (peft refuses such
    a folder too); a config nested 100,000 levels deep ended in a RecursionError."""
    from safetensors.numpy import save_file

    from qwen15_exp.errors import UserError
    from qwen15_exp.weights.peft import read_peft
    folder = tmp_path / "adapter"
    folder.mkdir()
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{module}.lora_A.weight": np.zeros((8, 64), np.float32),
               f"{module}.lora_B.weight": np.zeros((64, 8), np.float32)}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="says r=16 but its adapter tensors have rank 8"):
        read_peft(folder)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="is not a readable PEFT adapter_config.json"):
        read_peft(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    assert read_peft(folder).rank == 8


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (a tmpfs mounted ro: root ignores file modes); skipped where mounting is not
    allowed."""
    import subprocess
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_roots_and_outputs_are_one_line(tmp_path, read_only_folder):
    """A read-only output root, cache root or prepare output= ended in tracebacks; each is one line and exit 2."""
    for args, env, needle in (
            (["launch.mode=plan"], {"QWEN15_EXP_OUTPUTS": str(read_only_folder / "out")}, "QWEN15_EXP_OUTPUTS"),
            (["launch.mode=plan"], {"XDG_CACHE_HOME": str(read_only_folder / "cache")}, "XDG_CACHE_HOME"),
    ):
        r = run_cli(args, tmp_path / "run", env=env)
        assert r.returncode == 2 and "Read-only file system" in r.stderr and needle in r.stderr, r.stderr[-800:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(["data=alpaca_sample", f"output={read_only_folder / 'data'}"], tmp_path / "prep",
                module="qwen15_exp.prepare")
    assert r.returncode == 2 and "Read-only file system" in r.stderr and "Traceback" not in r.stderr
