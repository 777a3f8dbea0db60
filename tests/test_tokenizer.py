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
