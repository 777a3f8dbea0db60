"""Semantic validation: every problem is found, named and given a fix, before anything runs."""
import pytest

from qwen15_exp.validate import format_problems, validate
from helpers import make_experiment, run_cli

ASCEND = "hardware=atlas_800t_a2"


def keys(problems):
    return [p.key for p in problems]


def test_default_and_recipe_layouts_are_valid():
    for overrides in ([], ["model=72b", "parallel=mp8pp4", ASCEND], ["model=7b", "parallel=dp8", ASCEND,
                                                                    "phase.recompute.recompute=true"],
                      ["model=14b", "parallel=mp2pp4", ASCEND, "parallel.offset=[-1,1,1,-1]"],
                      ["model=72b", "parallel=mp4", "phase=chat", ASCEND]):
        assert validate(make_experiment(overrides)) == [], overrides


def test_heads_not_divisible_by_mp_names_the_terms_and_a_fix():
    problems = validate(make_experiment(["model=72b", "parallel.model_parallel=3", ASCEND]))
    p = next(p for p in problems if p.key == "parallel.model_parallel")
    assert "num_heads=64" in p.message and "model_parallel=3" in p.message
    assert "[1, 2, 4, 8]" in p.fix and "parallel.model_parallel=4" in p.fix


def test_gqa_kv_heads_limit_mp():
    problems = validate(make_experiment(["model=32b", "parallel.model_parallel=10", ASCEND]))
    assert any("n_kv_heads=8" in p.message for p in problems)


def test_devices_must_fill_nodes():
    problems = validate(make_experiment(["model=7b", "parallel.data_parallel=12", ASCEND]))
    assert any("does not fill whole nodes of 8" in p.message for p in problems)


def test_explicit_nodes_must_match_devices():
    problems = validate(make_experiment(["model=72b", "parallel=mp8pp4", "parallel.nodes=2", ASCEND]))
    p = next(p for p in problems if p.key == "parallel.nodes")
    assert "32 devices" in p.message and "nodes=2" in p.message and "parallel.nodes=4" in p.fix


def test_pipeline_offsets_and_micro_batches():
    problems = validate(make_experiment(["model=14b", "parallel=mp2pp4", "parallel.offset=[1,1,1]",
                                         "parallel.micro_batch_num=2", ASCEND]))
    assert set(keys(problems)) >= {"parallel.offset", "parallel.micro_batch_num"}
    problems = validate(make_experiment(["model=14b", "parallel=mp2pp4", "parallel.offset=[2,1,1,-1]", ASCEND]))
    assert any("sum 43" in p.message for p in problems)


def test_vocab_must_split_when_embedding_is_sharded():
    exp = make_experiment(["model=7b", "parallel=mp8", ASCEND, "model.vocab_size=151935"])
    assert "parallel.vocab_emb_dp" in keys(validate(exp))


def test_model_parallel_on_cpu_is_refused_with_the_alternative():
    problems = validate(make_experiment(["parallel=mp2", "hardware=cpu"]))
    p = next(p for p in problems if p.key == "parallel.model_parallel")
    assert "CPU" in p.message and "parallel=dp2" in p.fix


def test_memory_over_budget():
    problems = validate(make_experiment(["model=72b", "parallel=single", ASCEND]))
    p = next(p for p in problems if p.key == "hardware.max_device_memory")
    assert "over the budget of 58 GB" in p.message


def test_missing_data_file_and_checkpoint():
    problems = validate(make_experiment(["data=alpaca", "data.input=/nonexistent/alpaca.json",
                                         "phase.load_checkpoint=/nonexistent/x.ckpt"]))
    assert set(keys(problems)) >= {"data.input", "phase.load_checkpoint"}


def test_all_problems_are_reported_together():
    problems = validate(make_experiment(["model=72b", "parallel.model_parallel=3", "parallel.pipeline_stage=3",
                                         "parallel.micro_batch_num=1", ASCEND]))
    assert len(problems) >= 3
    text = format_problems(problems)
    assert text.startswith(f"{len(problems)} problems found; nothing was run:")


@pytest.mark.parametrize("override,key", [("parallel.data_parallel=0", "parallel.data_parallel"),
                                          ("phase.max_steps=-5", "phase.max_steps"),
                                          ("phase.gradient_accumulation_steps=0", "phase.gradient_accumulation_steps")])
def test_bad_numbers(override, key):
    assert key in keys(validate(make_experiment([override])))


@pytest.mark.parametrize("override,allowed", [
    ("phase.run_mode=training", "[train, finetune, predict, eval]"),
    ("phase.precision.compute=fp8", "[float32, float16, bfloat16]"),
    ("data.format=parquet", "[alpaca, chatml, wiki, mindrecord, none]"),
    ("launch.mode=slurm", "[auto, local, msrun, plan]")])
def test_bad_choices_fail_at_compose_naming_the_allowed_values(override, allowed):
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException) as e:
        make_experiment([override])
    assert allowed in str(e.value.__cause__)


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path):
    r = run_cli(["data.tokenizer_dir=/nonexistent"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "data.tokenizer_dir" in r.stderr and "/nonexistent/vocab.json" in r.stderr
    assert not list((tmp_path / "outputs").rglob("mindformers.yaml"))


def test_a_generation_job_that_would_not_fit_is_refused_with_the_seq_length_that_fits():
    """The cache (batch x seq_length) and the prefill's scores grow with the batch: a 0.5B chat at batch 32 and
    seq_length 8192 cannot fit 24 GB; the fix names a seq_length that does, and that one validates."""
    exp = make_experiment(["model=0_5b", "phase=chat", "hardware=cpu", "phase.batch_size=32",
                           "hardware.device_memory_gb=24"])
    [problem] = validate(exp)
    assert problem.key == "hardware.max_device_memory" and "KV cache" in problem.message
    fit = int(problem.fix.split("data.seq_length=")[1].split()[0])
    assert fit < 8192
    assert not validate(make_experiment(["model=0_5b", "phase=chat", "hardware=cpu", "phase.batch_size=32",
                                         "hardware.device_memory_gb=24", f"data.seq_length={fit}"]))
    [weights] = validate(make_experiment(["model=7b", "phase=predict", "hardware=cpu", "hardware.device_memory_gb=24"]))
    assert "the weights alone" in weights.fix
