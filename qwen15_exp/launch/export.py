"""MindIR export (phase=export), as the seed's `--run_mode export` did: MindSpore's `export` writes the model's
graph and weights for MindSpore Lite, per rank, under output/mindir_full_checkpoint (the prefill graph) and,
where the KV cache is on (use_past, Ascend), output/mindir_inc_checkpoint (one-token incremental decoding).

Without the KV cache (this CPU) the exported graph is input_ids (batch, seq_length) -> logits (batch,
seq_length, vocab). With it, the graphs take MindFormers' paged-attention inputs (batch_valid_length,
block_tables, slot_mapping) and switch between prefill and decoding with the `is_first_iteration` flag, as
MindFormers' own generate does. Each graph is loaded back with `mindspore.load` + `nn.GraphCell` and compared
with the eager network where this machine can run it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FULL, INC = "mindir_full_checkpoint", "mindir_inc_checkpoint"


def logits_cell(network):
    """input_ids -> logits of every position: the graph exported when there is no KV cache."""
    from mindspore import nn

    class Logits(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, input_ids):
            return self.net.lm_head(self.net.model(input_ids))

    return Logits(network)


def paged_inputs(batch: int, seq: int, block_size: int, num_blocks: int, first: bool) -> tuple:
    """The positional inputs of LlamaForCausalLM.construct for a KV-cache graph (prefill or one new token)."""
    import mindspore as ms
    tokens = seq if first else 1
    blocks_per_seq = max(1, num_blocks // batch)
    return (ms.Tensor(np.ones((batch, tokens)), ms.int32), None, None, None, None, None, None,
            ms.Tensor(np.full((batch,), seq if first else 1), ms.int32), None, None,
            ms.Tensor(np.arange(batch * blocks_per_seq).reshape(batch, blocks_per_seq), ms.int32),
            ms.Tensor(np.arange(batch * tokens), ms.int32))


def export_mindir(network, model_config: dict, out_dir: Path, rank: int = 0) -> list[Path]:
    """Write the graph(s) as <out_dir>/<FULL|INC>/rank_<r>_graph.mindir (weights beside them when large)."""
    import mindspore as ms
    batch, seq = model_config["batch_size"], model_config["seq_length"]
    files = []
    if not model_config.get("use_past"):
        target = Path(out_dir) / FULL / f"rank_{rank}_graph"
        target.parent.mkdir(parents=True, exist_ok=True)
        ms.export(logits_cell(network), ms.Tensor(np.ones((batch, seq)), ms.int32), file_name=str(target),
                  file_format="MINDIR")
        return [target.with_suffix(".mindir")]
    for folder, first in ((FULL, True), (INC, False)):
        target = Path(out_dir) / folder / f"rank_{rank}_graph"
        target.parent.mkdir(parents=True, exist_ok=True)
        network.add_flags_recursive(is_first_iteration=first)
        ms.export(network, *paged_inputs(batch, seq, model_config.get("block_size", 32),
                                         model_config.get("num_blocks", 128), first),
                  file_name=str(target), file_format="MINDIR")
        files.append(target.with_suffix(".mindir"))
    network.add_flags_recursive(is_first_iteration=True)
    return files


def check_against_eager(network, mindir: Path, model_config: dict, seed: int = 0) -> dict:
    """Load the exported prefill graph (mindspore.load + nn.GraphCell) and compare its logits with the eager
    network's on random token ids."""
    import mindspore as ms
    from mindspore import nn
    batch, seq = model_config["batch_size"], model_config["seq_length"]
    ids = ms.Tensor(np.random.default_rng(seed).integers(0, model_config["vocab_size"], (batch, seq)), ms.int32)
    eager = logits_cell(network)(ids).asnumpy()
    loaded = nn.GraphCell(ms.load(str(mindir)))(ids).asnumpy()
    return {"max_abs_diff": float(np.abs(eager - loaded).max()), "logits_shape": list(loaded.shape),
            "compared_on": f"{batch} x {seq} random token ids"}


def lite_ini(rank_table: str = "") -> str:
    """MindSpore Lite's GE options for the exported graphs (the seed's lite.ini)."""
    lines = ["[ascend_context]", "provider=ge"]
    if rank_table:
        lines.append(f"rank_table_file={rank_table}")
    lines += ["", "[ge_session_options]", "ge.externalWeight=1", "ge.exec.atomicCleanPolicy=1", "ge.event=notify",
              "ge.exec.staticMemoryPolicy=2", "ge.exec.formatMode=1",
              "ge.exec.precision_mode=must_keep_origin_dtype", ""]
    return "\n".join(lines)


def run_export(plan, exp, rank: int = 0) -> dict:
    """Build the network the plan describes, load its weights, export, and check the prefill graph."""
    import time

    from qwen15_exp.launch.generate import Generator
    from qwen15_exp.launch.start import in_run_dir
    from qwen15_exp.run_files import mindformers_env
    t0 = time.perf_counter()
    out_dir = Path(plan.run_dir) / "output"
    with in_run_dir(plan.run_dir, mindformers_env(plan.run_dir)):
        network = Generator(plan.mindformers, exp.phase.load_checkpoint, quiet=True).model
        mc = plan.mindformers["model"]["model_config"]
        files = export_mindir(network, mc, out_dir, rank)
        check = check_against_eager(network, files[0], mc) if not mc.get("use_past") else None
    return {"mindir": [str(f) for f in files], "mindir_mb": round(sum(_size(f) for f in files) / 1e6, 2),
            "check": check, "weights": exp.phase.load_checkpoint or "random (no phase.load_checkpoint)",
            "seconds": round(time.perf_counter() - t0, 3)}


def _size(graph: Path) -> int:
    """The graph file plus its external weights folder (MindSpore writes <name>_variables/ for large models)."""
    variables = graph.with_name(graph.stem + "_variables")
    return graph.stat().st_size + sum(p.stat().st_size for p in variables.rglob("*") if p.is_file())
