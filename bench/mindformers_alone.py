"""Train a written mindformers.yaml with MindFormers' API only (the calls run_mindformer.py makes).

Usage: python bench/mindformers_alone.py RUN_DIR/mindformers.yaml OUTPUT_DIR
The only qwen15_exp import is the CPU train-step wrapper the YAML names for hardware=cpu.
"""
import os
import sys

yaml_path, out = sys.argv[1], sys.argv[2]
os.environ["LOCAL_DEFAULT_PATH"] = out
os.environ["LOG_MF_PATH"] = os.path.join(out, "log")
os.makedirs(out, exist_ok=True)
os.chdir(out)

import qwen15_exp.mindformers_ext  # noqa: E402,F401
from mindformers.core.context import build_context  # noqa: E402
from mindformers.tools.register import MindFormerConfig  # noqa: E402
from mindformers.trainer import Trainer  # noqa: E402
from mindformers.utils.file_utils import set_output_path  # noqa: E402

config = MindFormerConfig(yaml_path)
config.output_dir = out
set_output_path(out)
build_context(config)
Trainer(config).train()
