"""python -m qwen15_exp.tune: the search space, what it keeps, the published layouts, the experiment file."""
import json
from collections import Counter

import pytest

from helpers import make_experiment, run_cli
from qwen15_exp import search
from qwen15_exp.compose import group_options
from qwen15_exp.estimate.memory import estimate_memory
from qwen15_exp.layout import layout_of
from qwen15_exp.ranks import resolved, spearman, tied_ranks
from qwen15_exp.validate import validate


def split(c):
    return c.dp, c.mp, c.pp, c.batch_size, c.accumulation, c.interleave


def test_the_search_space_of_a_small_case_is_the_hand_enumeration():
    # tiny: 2 layers, 4 heads; 4 devices of an 8-device node; a global batch of 4 samples
    exp = make_experiment(["model=tiny", "hardware=atlas_800t_a2"])
    space = list(search.search_space(exp, 4, 4))
    kept = [c for c, _ in space if c is not None]
    # (dp, mp, pp, micro-batch size, micro-batches, interleave): mp divides the heads; pp <= 2 layers; a
    # pipeline needs at least pp micro-batches; dp x batch x interleave x micro-batches = 4 samples; under
    # model parallel an even micro-batch may also run as two interleaved halves
    assert set(map(split, kept)) == {(4, 1, 1, 1, 1, 1), (2, 1, 2, 1, 2, 1), (2, 2, 1, 1, 2, 1),
                                     (2, 2, 1, 2, 1, 1), (2, 2, 1, 1, 1, 2),
                                     (1, 2, 2, 1, 4, 1), (1, 2, 2, 2, 2, 1), (1, 2, 2, 1, 2, 2),
                                     (1, 4, 1, 1, 4, 1), (1, 4, 1, 2, 2, 1), (1, 4, 1, 1, 2, 2),
                                     (1, 4, 1, 4, 1, 1), (1, 4, 1, 2, 1, 2)}
    # each layout x 3 recompute modes x sequence parallel (mp > 1) x parallel optimizer (dp > 1) x
    # vocab_emb_dp (mp > 1); the tied 64-wide tiny model's offset search finds nothing to move
    variants = Counter(map(split, kept))
    for (dp, mp, pp, _, _, _), n in variants.items():
        assert n == 3 * (2 if mp > 1 else 1) * (2 if dp > 1 else 1) * (2 if mp > 1 else 1)
    reasons = Counter(r for c, r in space if c is None)
    assert reasons == {"more pipeline stages than the model's 2 layers": 1,
                       "fewer micro-batches than pipeline stages": 2}


def test_uneven_pipelines_get_a_searched_offset():
    # 80 layers over 3 stages: MindFormers' split [26, 27, 27]; lm_head's work moves layers off the last stage
    offset = search.balanced_offset(80, 3, 2.0)
    assert offset != 0 and sum(offset) == 0 and offset[-1] < 0


def test_every_kept_layout_passes_validate_and_fits():
    exp = make_experiment(["model=7b", "phase=finetune", "hardware=atlas_800t_a2", "data.seq_length=4096"])
    result = search.tune(exp, 16, 32)
    assert result.kept and result.searched == len(result.kept) + sum(result.rejected.values())
    for s in result.kept:
        run = search.apply(exp, s.candidate)
        assert validate(run) == [], search.describe(s.candidate)
        assert estimate_memory(run).fits and layout_of(run).global_batch == 32 and layout_of(run).devices == 16
    speeds = [s.tokens_per_s for s in result.kept]
    assert speeds == sorted(speeds, reverse=True)


def published_training_rows():
    return [f"{t}/{r}" for t in ("800t_a2", "900_a2_podc") for r in group_options(f"table/{t}") if "predict" not in r]


@pytest.mark.parametrize("row", published_training_rows())
def test_the_published_layout_of_each_row_is_feasible_and_in_the_top_10(row):
    exp = make_experiment([f"+table={row}"])
    L = layout_of(exp)
    assert estimate_memory(exp).fits, "our own memory check must not reject a published layout"
    result = search.tune(exp, L.devices, L.global_batch)
    top = [(s.candidate.dp, s.candidate.mp, s.candidate.pp) for s in result.best[:10]]
    assert (L.data_parallel, L.model_parallel, L.pipeline_stage) in top, (row, top)


def test_tune_writes_an_experiment_that_plans_its_ranks_as_a_sweep(tmp_path):
    conf = tmp_path / "conf"
    r = run_cli(["model=7b", "phase=finetune", "hardware=atlas_900_a2_podc", "data.seq_length=4096", "tune.nodes=2",
                 "tune.global_batch=64", "tune.top_k=3", "tune.name=seven", f"tune.config_dir={conf}"], tmp_path,
                module="qwen15_exp.tune")
    assert r.returncode == 0, r.stderr
    assert "searched" in r.stdout and "rejected" in r.stdout and "python -m qwen15_exp model=7b" in r.stdout
    assert sorted(p.name for p in (conf / "experiment" / "tuned" / "seven").iterdir()) == \
        ["rank1.yaml", "rank2.yaml", "rank3.yaml"]
    estimated = [float(line.split()[-2].replace(",", "")) for line in r.stdout.splitlines()
                 if line.strip()[:2] in ("1 ", "2 ", "3 ")]
    r = run_cli([f"--config-dir={conf}", "-m", "+experiment=tuned/seven"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    results = sorted((tmp_path / "outputs" / "multirun").rglob("result.json"), key=lambda p: int(p.parent.name))
    assert len(results) == 3
    for path, est in zip(results, estimated):
        res = json.loads(path.read_text())
        assert res["status"] == "planned" and res["plan"]["global_batch"] == 64 and res["plan"]["devices"] == 16
        assert round(res["plan"]["throughput"]["tokens_per_s_per_device"]) == pytest.approx(est, abs=1)


@pytest.mark.parametrize("args, says", [
    (["model=7b", "hardware=atlas_800t_a2"], "tune.devices=<N> or tune.nodes=<N>"),
    (["model=7b", "hardware=atlas_800t_a2", "tune.devices=8", "tune.name=7b"], "starting with a letter"),
    (["model=7b", "hardware=atlas_800t_a2", "tune.devices=8", "phase=chat"], "does not train"),
    (["model=7b", "hardware=atlas_800t_a2", "tune.devices=8", "tune.nodes=2"], "disagree"),
    (["model=nope", "tune.devices=8"], "nope"),
])
def test_bad_tune_requests_are_explained(tmp_path, args, says):
    r = run_cli(args, tmp_path, module="qwen15_exp.tune")
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_tune_writes_under_the_output_root_and_suggests_commands_without_its_own_run_dir(tmp_path):
    """By default the experiment goes under <outputs>/conf (never the package's conf/), which is on Hydra's
    search path: `+experiment=tuned/<name>` composes with no --config-dir. The suggested commands repeat the
    job's overrides, not tune's hydra.run.dir (every suggested run would write into tune's folder)."""
    from qwen15_exp.compose import conf_dir
    r = run_cli(["model=7b", "phase=finetune", "hardware=atlas_800t_a2", "tune.devices=8", "tune.global_batch=16",
                 "tune.top_k=2", "tune.name=mine", f"hydra.run.dir={tmp_path / 'tune_dir'}"], tmp_path,
                module="qwen15_exp.tune")
    assert r.returncode == 0, r.stderr
    written = tmp_path / "outputs" / "conf" / "experiment" / "tuned"
    assert (written / "mine.yaml").is_file() and sorted(p.name for p in (written / "mine").iterdir()) == \
        ["rank1.yaml", "rank2.yaml"]
    assert not (conf_dir() / "experiment" / "tuned" / "mine.yaml").exists()
    commands = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("python -m qwen15_exp ")]
    assert len(commands) == 2 and not any("hydra.run.dir" in c or "tune." in c for c in commands), commands
    assert "python -m qwen15_exp -m +experiment=tuned/mine" in r.stdout and "--config-dir" not in r.stdout
    r = run_cli(["-m", "+experiment=tuned/mine"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path / "outputs" / "multirun").rglob("result.json"))) == 2


def test_no_layout_for_the_global_batch_suggests_global_batches_that_fit(tmp_path):
    """72B finetune's own global batch is 1 with the single layout: on 32 devices no data-parallel degree divides
    it. The advice names the global batch and values of tune.global_batch that admit layouts (not 'a smaller
    global batch'), and each suggested value does."""
    r = run_cli(["model=72b", "phase=finetune", "hardware=atlas_800t_a2", "tune.devices=32"], tmp_path,
                module="qwen15_exp.tune")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "global batch 1" in r.stderr and "smaller global batch" not in r.stderr
    suggested = [int(x) for x in r.stderr.split("tune.global_batch=")[-1].split()[0::2]]
    assert suggested and all(gb > 1 for gb in suggested)
    exp = make_experiment(["model=72b", "phase=finetune", "hardware=atlas_800t_a2"])
    assert all(search.tune(exp, 32, gb).kept for gb in suggested)
    assert not search.tune(exp, 32, 1).kept


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 2], [1, 2]) is None


def test_estimates_closer_than_the_rank_resolution_tie():
    """Two layouts 1 % apart are not ordered by an estimator good to 3 %: the measured order between them must
    not count for or against it (tiny and mini, each with and without recompute, as bench/tune measures)."""
    estimated, measured = [512, 510, 269, 266], [509, 525, 265, 297]     # a real run: both pairs came out reversed
    assert spearman(estimated, measured) == pytest.approx(0.6)
    assert resolved(estimated, 0.03) == [512, 512, 269, 269]
    assert spearman(estimated, measured, 0.03) == pytest.approx(0.8944, abs=1e-4)   # ties at their mean rank
    assert tied_ranks([343, 337, 334, 327, 327], 0.02) == ["1=", "1=", "3", "4=", "4="]  # runs from the top
    assert tied_ranks([100, 90, 80], 0.0) == ["1", "2", "3"]
