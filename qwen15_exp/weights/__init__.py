"""Weights, in one package: streaming safetensors I/O (tensors), the HF <-> MindFormers name table (names),
conversion both ways (convert), and what a checkpoint path is plus the converted-weights cache (checkpoint).
`python -m qwen15_exp.convert` is the command-line entry."""
