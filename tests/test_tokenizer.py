"""Tokenizer tests: llama.cpp's own vocabulary test vectors, pre-tokenizer splits reasoned from
llama.cpp's regexes, SmolLM2 ids recorded from llama.cpp, and malformed metadata.

The vocab files live in shared/vocab (a sibling of the repository, or $FLEXINFER_SHARED/vocab);
tests that need them skip when they are absent. SmolLM2 comes from conftest's smollm2_path.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from flexinfer.errors import FlexInferError, GGUFError
from flexinfer.gguf_file import read_gguf
from flexinfer.pretokenize import PRE_TOKENIZERS, split
from flexinfer.tokenizer import StreamDecoder, Tokenizer, bytes_to_unicode

REPO = Path(__file__).resolve().parent.parent
SEP = "\n__ggml_vocab_test__\n"  # separates the strings of a .inp file
VOCABS = ("deepseek-llm", "falcon", "gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2")
CASES_PER_VOCAB = 46  # strings in each .inp file


def vocab_dir() -> Path | None:
    roots = [Path(os.environ["FLEXINFER_SHARED"])] if os.environ.get("FLEXINFER_SHARED") else []
    for root in roots + [REPO.parent / "shared"]:
        if (root / "vocab").is_dir():
            return root / "vocab"
    return None


def need_vocab(name: str) -> Path:
    d = vocab_dir()
    if d is None or not (d / f"ggml-vocab-{name}.gguf").is_file():
        pytest.skip(f"ggml-vocab-{name}.gguf not found: shared/vocab is not next to {REPO} "
                    "and FLEXINFER_SHARED is not set")
    return d / f"ggml-vocab-{name}.gguf"


@lru_cache(maxsize=None)
def vocab_tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(need_vocab(name)))


@lru_cache(maxsize=None)
def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    path = need_vocab(name)
    texts = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split(SEP)
    assert texts[-1] == "", "an .inp file ends with the separator"
    lines = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts[:-1], lines)]


# -- llama.cpp's vocabulary tests ------------------------------------------------------------

@pytest.mark.parametrize("name", VOCABS)
def test_vocab_file_has_all_cases(name):
    assert len(vocab_cases(name)) == CASES_PER_VOCAB


@pytest.mark.parametrize("index", range(CASES_PER_VOCAB))
@pytest.mark.parametrize("name", VOCABS)
def test_vocab_case(name, index):
    text, expected = vocab_cases(name)[index]
    assert vocab_tokenizer(name).encode(text, add_bos=False) == expected, repr(text)


ROUND_TRIP = ["Hello world", " leading and trailing  ", "tabs\tand\nnew lines\n\n", "it's 1234567",
              "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001F680",
              "\u0645\u0631\u062d\u0628\u0627"]


@pytest.mark.parametrize("name", VOCABS)
def test_decode_encode_round_trip(name):
    tok = vocab_tokenizer(name)
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_gpt2_decode_cleans_spaces_like_llama_cpp():
    text = "Hello , world ! it 's ' quoted ' ok ?"
    assert vocab_tokenizer("gpt-2").decode(vocab_tokenizer("gpt-2").encode(text)) == \
        "Hello, world! it's'quoted'ok?"
    assert vocab_tokenizer("qwen2").decode(vocab_tokenizer("qwen2").encode(text)) == text


def test_spm_bos_and_leading_space():
    tok = vocab_tokenizer("llama-spm")
    assert (tok.add_bos, tok.bos_id, tok.eos_id) == (True, 1, 2)
    ids = tok.encode("Hello")
    assert ids[0] == 1 and ids[1:] == tok.encode("Hello", add_bos=False)
    assert tok.token_bytes(ids[1]) == b" Hello"  # "\u2581Hello"
    assert tok.decode(ids[1:]) == "Hello"  # the first token's space is the prefix llama adds
    assert tok.decode(ids) == " Hello"  # llama.cpp strips only the very first token's space
    assert tok.token_bytes(1) == b"<s>" and tok.token_bytes(1, special=False) == b""
    assert tok.token_bytes(tok.tokens.index("<0x0A>")) == b"\n"


def test_bos_defaults_per_family():
    assert not vocab_tokenizer("gpt-2").add_bos
    assert vocab_tokenizer("gpt-2").encode("hi") == vocab_tokenizer("gpt-2").encode("hi", False)
    assert vocab_tokenizer("llama-bpe").add_bos  # pre llama-bpe adds BOS, as in llama.cpp
    assert vocab_tokenizer("llama-bpe").encode("hi")[0] == 128000


def test_eog_ids():
    assert {128001, 128009} <= vocab_tokenizer("llama-bpe").eog_ids  # <|end_of_text|>, <|eot_id|>
    assert {151643, 151645} <= vocab_tokenizer("qwen2").eog_ids  # <|endoftext|>, <|im_end|>
    assert vocab_tokenizer("llama-spm").eog_ids == {2}
    assert {2, 32000, 32007} <= vocab_tokenizer("phi-3").eog_ids  # </s> <|endoftext|> <|end|>


def test_parse_special_qwen2():
    tok = vocab_tokenizer("qwen2")
    assert tok.encode("<|im_start|>user", parse_special=True) == [151644, 872]
    plain = tok.encode("<|im_start|>user")
    assert 151644 not in plain and len(plain) > 2
    assert tok.decode(plain) == "<|im_start|>user"
    assert tok.decode([151644, 872]) == "user"  # control tokens render as nothing


def test_user_defined_tokens_are_always_cut_out():
    tok = vocab_tokenizer("deepseek-llm")  # 2398 single characters are user-defined tokens
    o_umlaut = tok.tokens.index("\u00f6")
    enc = lambda text: tok.encode(text, add_bos=False)  # noqa: E731
    assert enc("sch\u00f6n") == [*enc("sch"), o_umlaut, *enc("n")]


def test_phi3_strips_whitespace_after_special_tokens():
    tok = vocab_tokenizer("phi-3")  # llama.cpp keys this on general.name "Phi3"
    assert tok.encode("<|end|>  \n x", add_bos=False, parse_special=True) == \
        [32007] + tok.encode("x", add_bos=False)


def test_stream_decoder_holds_back_split_emoji():
    tok = vocab_tokenizer("llama-spm")
    ids = tok.encode("\U0001F680", add_bos=False)  # no token for it: byte fallback
    assert [tok.tokens[i] for i in ids] == ["\u2581", "<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    stream = StreamDecoder(tok)
    assert [stream.feed(i) for i in ids] == [" ", "", "", "", "\U0001F680"]
    assert stream.flush() == ""


def test_build_time_152k_vocab():
    g = read_gguf(need_vocab("qwen2"))
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(g)
    took = time.perf_counter() - t0
    assert tok.n_vocab == 151936
    assert took < 3.0, f"building the 152k qwen2 tokenizer took {took:.2f} s"


# -- SmolLM2 against ids recorded from llama.cpp (scripts/make_smollm2_tokens.py) ---------------

SMOLLM2_DATA = json.loads((REPO / "tests" / "data" / "smollm2_tokens.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(smollm2_path))


@pytest.mark.parametrize("case", SMOLLM2_DATA["cases"], ids=lambda c: repr(c["text"][:30]))
def test_smollm2_matches_llama_cpp(smollm2, case):
    assert smollm2.encode(case["text"], add_bos=False) == case["ids"]
    assert smollm2.encode(case["text"], add_bos=False, parse_special=True) == \
        case["ids_parse_special"]
    assert smollm2.decode(case["ids"]) == case["decoded"]


def test_smollm2_specials(smollm2):
    assert smollm2.pre == "smollm" and not smollm2.add_bos
    assert sorted(smollm2.eog_ids) == SMOLLM2_DATA["eog_ids"]  # <|endoftext|> <|im_end|> <reponame>
    assert smollm2.encode("<|im_start|>", parse_special=True) == [1]
    assert smollm2.encode("<|im_start|>") == smollm2.encode("<|im_start|>", parse_special=False)
    assert 1 not in smollm2.encode("<|im_start|>")


# -- pre-tokenizer regexes: expected splits reasoned from llama.cpp's patterns -----------------

SPLITS = [
    # digits one by one, then GPT-2's pattern (starcoder, refact, smollm, ...)
    ("smollm", "I'm 2024 ok", ["I", "'m", " ", "2", "0", "2", "4", " ok"]),
    ("starcoder", "x=10", ["x", "=", "1", "0"]),
    ("command-r", "a 99", ["a", " ", "9", "9"]),
    # GPT-2: numbers whole, a run of spaces gives its last one to the next word
    ("gpt-2", "I'm 2024 ok  x\n\ny", ["I", "'m", " 2024", " ok", " ", " x", "\n", "\n", "y"]),
    ("mpt", "don't  stop", ["don", "'t", " ", " stop"]),
    # Llama 3: digits in threes, contractions any case, newlines kept with punctuation
    ("llama-bpe", "I'M 1234567 ok!!\n\n x",
     ["I", "'M", " ", "123", "456", "7", " ok", "!!\n\n", " x"]),
    ("qwen2", "I'M 1234567 ok!!\n\n x",
     ["I", "'M", " ", "1", "2", "3", "4", "5", "6", "7", " ok", "!!\n\n", " x"]),
    ("qwen2", "ab \ncd", ["ab", " \n", "cd"]),
    ("qwen2", "Ankara'dan", ["Ankara", "'d", "an"]),
    ("ufakzeka", "Ankara'dan", ["Ankara", "'dan"]),
    # qwen35 keeps combining marks in words, qwen2 does not
    ("qwen2", "cafe\u0301 x", ["cafe", "\u0301", " x"]),
    ("qwen35", "cafe\u0301 x", ["cafe\u0301", " x"]),
    ("deepseek-coder", "int x=12;\n", ["int", " x", "=", "1", "2", ";", "\n"]),
    ("deepseek-llm", "Hello, \u4e16\u754c 123\n",
     ["Hello", ",", " ", "\u4e16\u754c", " ", "123", "\n"]),
    # U+3000 is whitespace to llama.cpp, so it is not part of the CJK range U+0800-4E00
    ("deepseek-coder", "\u4e16\u3000\u754c", ["\u4e16", "\u3000", "\u754c"]),
    # '~' is not a symbol to llama.cpp's \p{S}: it only leads a word
    ("deepseek-v3", "a~~b 12345", ["a", "~", "~b", " ", "123", "45"]),
    ("falcon", "x=1234567!", ["x", "=", "123", "456", "7", "!"]),
    ("default", "a`b 1234", ["a", "`", "b", " ", "123", "4"]),
    ("bloom", "Hi, you (there)|ok.", ["Hi", ",", " you", " (", "there", ")|", "ok", "."]),
    ("viking", "ab12", ["ab", "1", "2"]),
    # upper-then-lower words; non-ASCII letters count as both cases in llama.cpp
    ("gpt-4o", "HelloWORLD isn't CamelCase 12345",
     ["Hello", "WORLD", " isn't", " Camel", "Case", " ", "123", "45"]),
    ("llama4", "\u00c4pfel\u00dcber", ["\u00c4pfel\u00dcber"]),
    ("tekken", "HelloWORLD isn't 123", ["Hello", "WORLD", " isn", "'t", " ", "1", "2", "3"]),
    ("gpt-4o", "cafe\u0301s", ["cafe", "\u0301s"]),
    ("granite-embed-multi-97m", "cafe\u0301s", ["cafe\u0301s"]),
    # numbers cut into threes from the right
    ("superbpe", "x 1234567 y", ["x ", "1", "234", "567", " y"]),
    ("tiny_aya", "1234567 12345abc", ["1", "234", "567", " ", "123", "45", "abc"]),
    ("kimi-k2", "\u4e2d\u6587abc's 12345", ["\u4e2d\u6587", "abc's", " ", "123", "45"]),
    ("kimi-k2", "x\u4e2d", ["x", "\u4e2d"]),
    ("seed-coder", "x!!\n\ny", ["x", "!!", "\n\n", "y"]),
    ("chameleon", "<sentinel:12>IMGIMGABZ  x",
     ["<", "sentinel", ":", "1", "2", ">", "IMGIMGABZ", "  ", "x"]),
    ("jais-2", "a" + " " * 7 + "b", ["a", " " * 4, " " * 2, " b"]),
    ("llama3", "a" + " " * 7 + "b", ["a", " " * 6, " b"]),
    ("laguna", "ab \ncd", ["ab", " ", "\n", "cd"]),
    ("minicpm5", "12345 ab", ["123", "45", " ab"]),
    ("exaone-moe", "New York is big", ["New York is big"]),
    ("spark2_5", "12345", ["1", "2", "3", "4", "5"]),
    ("youtu", "\uc548\ub155 world", ["\uc548\ub155", " world"]),
    ("bailingmoe", "it's\n\n", ["it", "'s", "\n\n"]),
]


@pytest.mark.parametrize("pre,text,pieces", SPLITS, ids=[f"{p}:{t[:16]!r}" for p, t, _ in SPLITS])
def test_pre_tokenizer_split(pre, text, pieces):
    assert split(PRE_TOKENIZERS[pre], text) == pieces


# -- synthetic vocabularies: every pre name, SentencePiece, malformed metadata ------------------

B2U = bytes_to_unicode()
WORDS = ["th", "the", "\u0120t", "\u0120th", "\u0120the"]  # "\u0120" is GPT-2's space


def bpe_metadata(pre: str = "gpt-2") -> dict:
    tokens = [B2U[b] for b in range(256)] + WORDS + ["<|endoftext|>", "<|user|>"]
    types = [1] * (len(tokens) - 2) + [3, 4]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": np.array(types, np.int32),
            "tokenizer.ggml.merges": ["t h", "th e", "\u0120 t", "\u0120t h", "\u0120th e"],
            "tokenizer.ggml.bos_token_id": len(tokens) - 2,
            "tokenizer.ggml.eos_token_id": len(tokens) - 2}


SPM_WORDS = ["\u2581", "h", "e", "l", "o", "\u2581h", "ll", "\u2581he", "llo", "\u2581hello"]


def spm_metadata() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_WORDS
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_WORDS)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_WORDS))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.array(scores, np.float32),
            "tokenizer.ggml.token_type": np.array(types, np.int32),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_builds_a_working_tokenizer(pre):
    tok = Tokenizer.from_metadata(bpe_metadata(pre), "synthetic.gguf")
    the = tok.tokens.index("the")
    assert tok.pre == pre and tok.encode("the", add_bos=False) == [the]
    text = "the 1234567 th\u00e9 \u65e5\u672c \U0001F680\n\tend<|user|>"
    ids = tok.encode(text, add_bos=False)
    assert tok.tokens.index("<|user|>") == ids[-1]  # user-defined: always its own id
    assert tok.decode(ids) == text


def test_missing_pre_is_default():
    md = bpe_metadata()
    del md["tokenizer.ggml.pre"]
    assert Tokenizer.from_metadata(md).pre == "default"


def test_unknown_pre_is_a_clear_error():
    with pytest.raises(FlexInferError, match=r"^m\.gguf: tokenizer\.ggml\.pre 'nope' is not "
                                             r"supported \(known: .*qwen2.*\)$"):
        Tokenizer.from_metadata(bpe_metadata("nope"), "m.gguf")


def test_synthetic_spm_merges_by_score_and_falls_back_to_bytes():
    tok = Tokenizer.from_metadata(spm_metadata())
    hello = tok.tokens.index("\u2581hello")
    assert tok.encode("hello hello") == [1, hello, hello]
    assert tok.encode("hi", add_bos=False) == [tok.tokens.index("\u2581h"), 3 + ord("i")]
    assert tok.decode(tok.encode("hello hi")) == " hello hi"
    assert tok.decode(tok.encode("hello hi", add_bos=False)) == "hello hi"


def test_stream_decoder_byte_level():
    tok = Tokenizer.from_metadata(bpe_metadata())
    ids = tok.encode("a\U0001F680", add_bos=False)  # no merges: one token per byte
    assert len(ids) == 5
    stream = StreamDecoder(tok)
    assert [stream.feed(i) for i in ids] == ["a", "", "", "", "\U0001F680"]
    stream.feed(ids[1])  # half an emoji left at the end
    assert stream.flush() == "\ufffd"


def bad(md: dict, key: str, value) -> dict:
    md = dict(md)
    if value is None:
        md.pop(key)
    else:
        md[key] = value
    return md


MALFORMED = [
    ("scores shorter", spm_metadata(), "tokenizer.ggml.scores", np.zeros(5, np.float32),
     r"tokenizer\.ggml\.scores: has 5 entries but tokenizer\.ggml\.tokens has 269"),
    ("types longer", spm_metadata(), "tokenizer.ggml.token_type", np.ones(300, np.int32),
     r"tokenizer\.ggml\.token_type: has 300 entries"),
    ("types as float", spm_metadata(), "tokenizer.ggml.token_type", np.ones(269, np.float32),
     r"tokenizer\.ggml\.token_type: expected an array of int32, got float32"),
    ("bos out of range", spm_metadata(), "tokenizer.ggml.bos_token_id", 269,
     r"tokenizer\.ggml\.bos_token_id: id 269 is outside the vocabulary of 269 tokens"),
    ("eos negative", bpe_metadata(), "tokenizer.ggml.eos_token_id", -1,
     r"tokenizer\.ggml\.eos_token_id: id -1 is outside"),
    ("padding as string", bpe_metadata(), "tokenizer.ggml.padding_token_id", "0",
     r"tokenizer\.ggml\.padding_token_id: expected int, got str"),
    ("no merges", bpe_metadata(), "tokenizer.ggml.merges", None,
     r"tokenizer\.ggml\.merges: missing"),
    ("no tokens", bpe_metadata(), "tokenizer.ggml.tokens", None,
     r"tokenizer\.ggml\.tokens: missing or empty"),
    ("tokens as numbers", bpe_metadata(), "tokenizer.ggml.tokens", np.arange(3),
     r"tokenizer\.ggml\.tokens: expected an array of strings"),
    ("duplicate token", bpe_metadata(), "tokenizer.ggml.tokens",
     ["a", "b", "a"] + [f"x{i}" for i in range(260)], r"'a' appears twice \(ids 0 and 2\)"),
    ("unknown model", bpe_metadata(), "tokenizer.ggml.model", "bert",
     r"tokenizer\.ggml\.model 'bert' is not supported"),
    ("add_bos without bos", bad(bpe_metadata(), "tokenizer.ggml.bos_token_id", None),
     "tokenizer.ggml.add_bos_token", True,
     r"add_bos_token is true but tokenizer\.ggml\.bos_token_id is not set"),
]


@pytest.mark.parametrize("what,md,key,value,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_metadata_is_a_gguf_error(what, md, key, value, message):
    with pytest.raises(GGUFError, match=r"^bad\.gguf: .*" + message) as err:
        Tokenizer.from_metadata(bad(md, key, value), "bad.gguf")
    assert "\n" not in str(err.value)


def test_lone_surrogates_encode_as_replacement_characters():
    tok = Tokenizer.from_metadata(bpe_metadata())
    assert tok.encode("a\udcff") == tok.encode("a\ufffd\ufffd\ufffd")  # its 3 UTF-8 bytes


def test_token_id_out_of_range_in_decode():
    tok = Tokenizer.from_metadata(bpe_metadata())
    with pytest.raises(FlexInferError, match="token id 999 is outside the vocabulary"):
        tok.decode([999])
