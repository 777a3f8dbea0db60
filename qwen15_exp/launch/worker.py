"""What msrun starts on every device: the run_mindformer.py calls on the run's mindformers.yaml.

`run_mindformer.py` is not shipped in the MindFormers wheel, so each run dir gets a 2-line worker.py that
calls this. Each rank records its losses and step times in rank_<N>.json beside the YAML, which the
launcher gathers into result.json.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

WORKER_STUB = """# Started by msrun on every device: trains mindformers.yaml (see qwen15_exp/launch/worker.py).
from qwen15_exp.launch.worker import main

main()
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="qwen15_exp msrun worker")
    ap.add_argument("--config", required=True, help="mindformers.yaml")
    ap.add_argument("--train_dataset_dir", default="", help="override train_dataset.data_loader.dataset_dir")
    ap.add_argument("--load_checkpoint", default="", help="override load_checkpoint")
    return ap.parse_args(argv)


def rank_id() -> int:
    for key in ("RANK_ID", "MS_NODE_ID", "RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def main(argv=None) -> None:
    t0 = time.time()
    args = parse_args(argv)
    yaml_path = Path(args.config).resolve()
    run_dir = yaml_path.parent
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(run_dir / "output"))
    os.environ.setdefault("LOG_MF_PATH", str(run_dir / "output" / "log"))

    from mindformers.core.context import build_context
    from mindformers.tools.register import MindFormerConfig
    from mindformers.trainer import Trainer
    from mindformers.utils.file_utils import set_output_path

    from qwen15_exp.io import write_json
    from qwen15_exp.mindformers_ext import StepRecorder

    config = MindFormerConfig(str(yaml_path))
    if not os.path.isabs(config.output_dir):
        config.output_dir = str(run_dir / config.output_dir)
    if args.train_dataset_dir:
        config.train_dataset.data_loader.dataset_dir = args.train_dataset_dir
        config.train_dataset_task.dataset_config.data_loader.dataset_dir = args.train_dataset_dir
    if args.load_checkpoint:
        config.load_checkpoint = args.load_checkpoint
    set_output_path(config.output_dir)
    build_context(config)
    recorder = StepRecorder()
    Trainer(config, callbacks=[recorder]).train()
    write_json(run_dir / f"rank_{rank_id()}.json", {
        "rank": rank_id(), "losses": recorder.losses, "step_times_s": recorder.step_times(),
        "first_step_unix": recorder.step_end_unix[0] if recorder.step_end_unix else None, "start_unix": t0})


if __name__ == "__main__":
    main()
