"""Property: compose -> validate -> plan never ends in a traceback, whatever the groups and overrides.

It ends in a composition error (Hydra's typed schema), a list of problems, or a valid plan. In CI
(CI=true) the examples are derandomized so a run is reproducible; locally each run explores new ones
(`pytest tests/test_property.py --hypothesis-seed=N`).
"""
from pathlib import Path

from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from qwen15_exp.compose import group_options, to_experiment
from qwen15_exp.plan import make_plan
from qwen15_exp.validate import validate
from helpers import compose_cfg

MODELS = group_options("model")
PHASES = group_options("phase")
PARALLEL = group_options("parallel")
HARDWARE = group_options("hardware")

degree = st.integers(min_value=0, max_value=24)
override = st.one_of(
    st.builds(lambda v: f"parallel.data_parallel={v}", degree),
    st.builds(lambda v: f"parallel.model_parallel={v}", degree),
    st.builds(lambda v: f"parallel.pipeline_stage={v}", degree),
    st.builds(lambda v: f"parallel.micro_batch_num={v}", st.integers(0, 600)),
    st.builds(lambda v: f"parallel.offset=[{','.join(map(str, v))}]", st.lists(st.integers(-3, 3), max_size=9)),
    st.builds(lambda v: f"parallel.offset={v}", st.sampled_from(["1", "[a,b]", "[1.5]", "x"])),
    st.builds(lambda v: f"parallel.nodes={v}", st.integers(0, 9)),
    st.builds(lambda v: f"parallel.vocab_emb_dp={v}", st.booleans()),
    st.builds(lambda v: f"data.seq_length={v}", st.integers(-1, 70000)),
    st.builds(lambda v: f"phase.batch_size={v}", st.integers(0, 9)),
    st.builds(lambda v: f"phase.recompute.recompute={v}", st.booleans()),
    st.builds(lambda v: f"phase.precision.compute={v}", st.sampled_from(["bfloat16", "float16", "float32", "fp8"])),
    st.builds(lambda v: f"model.n_kv_heads={v}", st.sampled_from(["null", "1", "2", "8", "7"])),
    st.builds(lambda v: f"hardware.devices_per_node={v}", st.integers(1, 16)),
    st.builds(lambda v: f"parallel.data_parallel={v}", st.sampled_from(["x", "1.5"])),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS), phase=st.sampled_from(PHASES), parallel=st.sampled_from(PARALLEL),
       hardware=st.sampled_from(HARDWARE), overrides=st.lists(override, max_size=5))
def test_compose_validate_plan_never_crashes(model, phase, parallel, hardware, overrides):
    args = [f"model={model}", f"phase={phase}", f"parallel={parallel}", f"hardware={hardware}",
            "launch.mode=plan", *overrides]
    try:
        cfg = compose_cfg(args)
    except (ConfigCompositionException, OmegaConfBaseException):
        return                                            # a typed-schema error, reported by Hydra
    exp = to_experiment(cfg, overrides=args)
    problems = validate(exp)
    if problems:
        assert all(p.group and p.key and p.message and p.fix for p in problems)
        return
    plan = make_plan(exp, Path("/plans/x"))
    assert plan.layout.devices == exp.parallel.data_parallel * exp.parallel.model_parallel * exp.parallel.pipeline_stage
    assert plan.memory.fits and plan.mindformers["parallel_config"]["model_parallel"] == exp.parallel.model_parallel
