"""`python -m qwen15_exp.convert`: Hugging Face Qwen1.5 <-> MindFormers weights (qwen15_exp/weights/).

    python -m qwen15_exp.convert direction=hf2mf input=/path/Qwen1.5-7B-Chat output=/path/qwen15_7b.safetensors
    python -m qwen15_exp.convert direction=hf2mf input=... output=/path/qwen15_7b.ckpt dtype=fp16
    python -m qwen15_exp.convert direction=mf2hf input=/path/qwen15_7b.safetensors output=/path/hf_dir model=7b
    python -m qwen15_exp.convert direction=lora_merge input=<phase=lora run dir> output=/path/merged.safetensors
    python -m qwen15_exp.convert direction=lora_peft input=<phase=lora run dir> output=/path/peft_adapter_dir

A PEFT folder (or a LoRA run dir) goes back in as `phase.adapter=<dir>` on top of `phase.load_checkpoint`.
"""
from __future__ import annotations


def task(cfg) -> None:
    from omegaconf import OmegaConf

    from qwen15_exp.weights.hf_conversion import convert
    summary = convert(OmegaConf.to_object(cfg))
    print(f"converted {summary.tensors} tensors, {summary.bytes_written / 1e6:,.1f} MB written "
          f"(largest tensor {summary.largest_tensor_bytes / 1e6:,.1f} MB):")
    for path in summary.outputs:
        print(f"  {path}")


def main() -> None:
    from qwen15_exp.cli import run_app
    run_app("convert", task)


if __name__ == "__main__":
    main()
