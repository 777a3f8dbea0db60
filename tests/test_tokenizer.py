"""The Qwen1.5 tokenizer built from vocab.json + merges.txt equals Hugging Face's Qwen2TokenizerFast."""
import pytest

from qwen15_exp.data.tokenizer import (BPE_VOCAB_SIZE, SPECIAL_TOKENS, TokenizerFilesError, load_tokenizer,
                                       tokenizer_files)

TEXTS = [
    "Hello world! How are you doing today?",
    "通义千问是阿里云研发的大语言模型。",
    "def add(a, b):\n    return a + b  # tabs\tand   spaces\n\n",
    "Emoji 🐙🚀 and accents: café, naïve, Ångström",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
    "<|im_start|>assistant\n",
    "Numbers 1234567890 and 3.14159, URLs https://example.com/a?b=c",
    "  leading spaces, trailing newline\r\n",
    "<|endoftext|>",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    vocab, merges = tokenizer_files()
    return transformers.Qwen2TokenizerFast(
        vocab_file=str(vocab), merges_file=str(merges), unk_token=None, bos_token=None,
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def test_special_tokens_have_the_qwen15_ids():
    tok = load_tokenizer()
    assert {t: tok.token_to_id(t) for t in SPECIAL_TOKENS} == {"<|endoftext|>": 151643, "<|im_start|>": 151644,
                                                              "<|im_end|>": 151645}
    assert tok.get_vocab_size() == BPE_VOCAB_SIZE + 3
    assert tok.token_to_id("<|object_ref_start|>") is None      # Qwen2's later specials are not Qwen1.5's


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_hf_qwen2_tokenizer_fast(hf_tokenizer, text):
    ours = load_tokenizer().encode(text, add_special_tokens=False).ids
    assert ours == hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_encode_round_trip(text):
    tok = load_tokenizer()
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_known_ids():
    tok = load_tokenizer()
    assert tok.encode("Hello world", add_special_tokens=False).ids == [9707, 1879]
    assert tok.encode("<|im_start|>user\n", add_special_tokens=False).ids == [151644, 872, 198]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(TokenizerFilesError, match="vocab.json"):
        tokenizer_files(tmp_path)


def mixed_texts(n: int, seed: int = 1) -> list[str]:
    """Random strings over the character classes the split regex and NFC treat differently."""
    import random
    rng = random.Random(seed)
    pools = ["abcXYZ'sdlltmrev ", "0123456789.,;:!?-@ ", " \t\n\r\u00a0\u2003\u3000", "你好世界我们的模型训练数据。，！",
             "éèêëàçñüöÅ\u0301\u0308", "😀👍🏽🇨🇳©®™½∑", "<|im_start|><|im_end|><|endoftext|>", "аБвГдеЖ αβγΔ", "ﬁﬂ①②Ⅷ㈱"]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_the_bulk_encoder_gives_the_tokenizers_ids():
    # data preparation encodes through tiktoken over the same ranks (about twice as fast); its ids must be the
    # tokenizer's on everything: the fixed texts, 5,000 random mixed strings, the shipped alpaca sample
    import json
    from importlib import resources

    from qwen15_exp.data.tokenizer import _TiktokenBatch, load_bulk_encoder
    bulk = load_bulk_encoder()
    assert isinstance(bulk, _TiktokenBatch)             # the fast path is the one taken with the real vocabulary
    records = json.loads(resources.files("qwen15_exp.samples").joinpath("alpaca_sample.json").read_text("utf-8"))
    texts = TEXTS + mixed_texts(5000) + [r[k] for r in records for k in ("instruction", "input", "output")]
    tok = load_tokenizer()
    assert bulk.encode_batch(texts) == [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_a_vocabulary_whose_ids_are_not_merge_ranks_falls_back_to_the_tokenizer(tmp_path):
    # ids shuffled away from the merge order: tiktoken would merge by id and give other tokens, so the probe
    # catches it and preparation encodes through `tokenizers`, whatever the speed
    import json
    import shutil

    from qwen15_exp.data.tokenizer import _TokenizersBatch, load_bulk_encoder
    vocab_file, merges_file = tokenizer_files()
    vocab = json.loads(vocab_file.read_text("utf-8"))
    swap = {"Ġthe": vocab["Ġt"], "Ġt": vocab["Ġthe"]}
    vocab.update(swap)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(merges_file, tmp_path / "merges.txt")
    bulk = load_bulk_encoder(str(tmp_path))
    assert isinstance(bulk, _TokenizersBatch)
    assert bulk.encode_batch(["at the"]) == [load_tokenizer(str(tmp_path)).encode("at the").ids]
