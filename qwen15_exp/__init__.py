"""qwen15_exp: Hydra-composed experiments for Qwen1.5 on MindSpore + MindFormers."""
