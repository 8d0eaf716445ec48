"""Pre-tokenizers for byte-level BPE vocabularies, one per `tokenizer.ggml.pre` name.

A GGUF file names its pre-tokenizer (`tokenizer.ggml.pre`) and llama.cpp maps that name to a list of
regexes (src/llama-vocab.cpp, the LLAMA_VOCAB_PRE_TYPE_* switch). The regexes run in sequence: the
first splits the text into pieces, each later one splits every piece of the one before, and what a
regex does not match stays a piece of its own (the `tokenizers` "isolated" split behaviour).
Byte-level BPE then merges inside each piece.

The regexes here are written for Oniguruma, the engine behind `tokenizers.Regex`, so that they split
exactly as llama.cpp does, quirks included. Three quirks of llama.cpp's matcher are reproduced:
  1. For \\p{..} classes llama.cpp maps ASCII characters through its own tables, where '~' is in
     neither \\p{P} nor \\p{S} (Unicode puts it in \\p{S}): `_no_tilde` takes it out of \\p{S}.
  2. \\p{Lu}, \\p{Ll}, \\p{Lt}, \\p{Lm}, \\p{Lo} all mean \\p{L} there (it keeps one letter
     flag), so the upper/lower-case patterns of gpt-4o and tekken become llama.cpp's rewrite: a
     letter that is not a-z, then a letter that is not A-Z.
  3. Regexes without \\p{..} see every non-ASCII whitespace character as \\v, so a literal range
     that spans one (U+3000 in deepseek's CJK ranges) does not match it: those ranges get `&&\\S`.
Literal non-ASCII ranges are written as \\x{..} escapes so the source stays ASCII.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers


@dataclass(frozen=True)
class PreTokenizer:
    """How one `tokenizer.ggml.pre` family splits text and decodes, after llama.cpp."""

    regexes: tuple[str, ...]  # Oniguruma patterns in order, each splitting the pieces of the last
    ignore_merges: bool = False  # a piece that is a whole vocabulary token is taken as is (llama3)
    clean_spaces: bool = True  # decode drops the space in " ?", " 's", ... (llama.cpp clean_spaces)
    add_bos: bool | None = None  # default of tokenizer.ggml.add_bos_token; None: the model's


def splitters(pre: PreTokenizer) -> list[pre_tokenizers.Split]:
    """One `tokenizers` Split step per regex; what a regex leaves unmatched stays a piece."""
    return [pre_tokenizers.Split(Regex(rx), "isolated") for rx in pre.regexes]


def split(pre: PreTokenizer, text: str) -> list[str]:
    """The pieces pre cuts text into, before the byte-level mapping (for tests and debugging)."""
    return [p for p, _ in pre_tokenizers.Sequence(splitters(pre)).pre_tokenize_str(text)]


def _no_tilde(rx: str) -> str:
    """Quirk 1: '~' is not a symbol to llama.cpp; every \\p{S} here ends a character class."""
    return rx.replace(r"\p{S}]", r"\p{S}&&[^~]]")


def _one_letter_class(rx: str) -> str:
    """Quirk 2: llama.cpp reads the letter sub-categories as \\p{L}."""
    for sub in ("Lu", "Ll", "Lt", "Lm", "Lo"):
        rx = rx.replace(r"\p{%s}" % sub, r"\p{L}")
    return rx


# English contractions, case-insensitive as llama.cpp rewrites (?i:'s|'t|...) for its engine
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# GPT-2's pattern; llama.cpp's hand-written matcher for it also takes a lone whitespace (\s+), which
# the "isolated" split gives anyway as an unmatched piece
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# Llama 3: digits in groups of up to 3, one optional non-letter before a word, newlines together
LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2: as Llama 3 but every digit alone
QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3.5: as Qwen2 with combining marks (\p{M}) kept inside words
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Jais 2: as Llama 3 with runs of whitespace cut in power-of-two lengths
JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         + r"|\s*[\r\n]+" + "".join(r"|\s{%d}(?!\S)" % n for n in (512, 256, 128, 64, 32, 16, 8, 4))
         + r"|\s{1,2}(?!\S)|\s{1}")

# Upper-then-lower word pattern of gpt-4o and tekken, in llama.cpp's rewrite (quirk 2)
_UPPER = r"(?:(?=\p{L})[^a-z])"
_LOWER = r"(?:(?=\p{L})[^A-Z])"
TEKKEN = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + r"+|[^\r\n\p{L}\p{N}]?" + _UPPER + "+"
          + _LOWER + r"*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS
         + r"?|[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER + "*" + _CONTRACTIONS
         + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# granite-embed-multi-97m: as gpt-4o with marks counted as letters in the look-aheads
GRANITE_MULTI = GPT4O.replace(r"(?=\p{L})", r"(?=[\p{L}\p{M}])")

# CJK ideographs (U+4E00-9FA5), hiragana and katakana (U+3040-30FF)
_CJK_KANA = r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"
# CJK, U+0800-4E00 and hangul; U+0800-4E00 spans non-ASCII spaces such as U+3000 (quirk 3)
_CJK_WIDE = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}&&\S]+"

# DeepSeek LLM: letters of the cased scripts (Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee,
# Glagolitic, Coptic, Deseret, Osage, Old Hungarian, Warang Citi, Adlam), from its tokenizer.json
_DEEPSEEK_LETTERS = (
    r"A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}"
    r"\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}"
    r"\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}"
    r"\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}"
    r"\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}"
    r"\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}"
    r"\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}"
    r"\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}"
    r"\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}"
    r"\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}"
    r"\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}"
    r"\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}"
    r"\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}"
    r"\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}"
    r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}")
# ASCII and full-width punctuation, curly quotes; U+3000 (ideographic space) left out (quirk 3)
_DEEPSEEK_PUNCT = r"!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3001}-\x{3002}"

# DeepSeek V3: one ASCII punctuation may lead a Latin word; '~' quirk applies to \p{S}
DEEPSEEK3_WORDS = _no_tilde(
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPARK_WORDS = _no_tilde(
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+")

# Bloom, Poro, GPT3-Finnish, Viking: anything but whitespace and sentence punctuation
# ( . , ! ? ellipsis, ideographic full stop/comma, Devanagari danda, Arabic full stop and comma)
_BLOOM = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+"

# Kimi K2: Han runs (llama.cpp's Han ranges), then words of other letters with a contraction
_HAN = (r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}"
        r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{F900}-\x{FAFF}"
        r"\x{2F800}-\x{2FA1F}")
KIMI_K2 = (r"[" + _HAN + r"]+|[^\r\n\p{L}\p{N}]?[\p{L}&&[^" + _HAN + r"]]+" + _CONTRACTIONS
           + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Tiny Aya: digits in groups of 3 counted from the right end of a number (\b is ASCII to llama.cpp's
# std::wregex, and after a digit it only means "no ASCII word character follows")
_TINY_AYA_DIGITS = r"[0-9]{1,3}(?=(?:[0-9]{3})*(?![0-9A-Za-z_]))"
TINY_AYA_WORDS = _one_letter_class(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS
    + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + _CONTRACTIONS + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# SuperBPE: a number splits before every group of 3 digits counted from its right end. llama.cpp
# splits at the zero-width matches of (?=(\d{3})+(?!\d)) but never at a piece's start; this pattern
# matches the pieces between those points instead (a zero-width split is not portable).
_SUPERBPE_GROUPS = r"[\s\S](?:(?![0-9]{3}(?:[0-9]{3})*(?![0-9]))[\s\S])*"

_YOUTU_CJK = (r"[\x{AC00}-\x{D7A3}\x{3131}-\x{318E}]+|[\x{FF01}\x{2026}\x{201C}\x{201D}\x{2018}"
              r"\x{2019}\x{2014}\x{FF1A}\x{FF1B}\x{FF0C}\x{3001}-\x{303F}\x{FE30}-\x{FE4F}]+"
              r"|[\x{3105}-\x{312F}]+|" + _CJK_KANA)
YOUTU_WORDS = TINY_AYA_WORDS.replace(r"|\p{N}{1,3}|", r"|\p{N}|")  # digits one by one

EXAONE_MOE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+")
BAILINGMOE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
UFAKZEKA = QWEN2[len(_CONTRACTIONS) + 1:]  # Qwen2 without the contractions (Turkish suffixes stay)
MINICPM5_WORDS = QWEN2.replace(r"|\p{N}|", r"|\p{N}+|")

_P = PreTokenizer
_DEFAULT = _P((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = _P((GPT2,))
_STARCODER = _P((r"\p{N}", GPT2))  # digits one by one, then GPT-2
_LLAMA3 = _P((LLAMA3,), ignore_merges=True, add_bos=True)
_DBRX = _P((LLAMA3,))
_QWEN2 = _P((QWEN2,), clean_spaces=False)
_DEEPSEEK3 = _P((r"\p{N}{1,3}", _CJK_KANA, DEEPSEEK3_WORDS), clean_spaces=False)
_GPT4O = _P((GPT4O,), clean_spaces=False)
_BLOOM_P = _P((_BLOOM,))

# tokenizer.ggml.pre -> PreTokenizer, grouped as llama.cpp groups the names into pre-types
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"), _LLAMA3),
    "deepseek-llm": _P((r"[\r\n]", r"\s?[" + _DEEPSEEK_LETTERS + r"]+",
                        r"\s?[" + _DEEPSEEK_PUNCT + r"]+", r"\s+\z", _CJK_WIDE, r"\p{N}+"),
                       clean_spaces=False),
    "deepseek-coder": _P((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_WIDE, r"\p{N}"),
                         clean_spaces=False),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _DEEPSEEK3),
    "spark2_5": _P((r"\p{N}{1,3}", _CJK_KANA, SPARK_WORDS, r"\p{N}"), clean_spaces=False),
    "youtu": _P((_YOUTU_CJK, YOUTU_WORDS), clean_spaces=False, ignore_merges=True),
    "falcon": _P((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                     "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais",
                     "exaone4"), _GPT2),
    "trillion": _P((GPT2,), clean_spaces=False),
    "granite-docling": _P((GPT2,), clean_spaces=False),
    "jais-2": _P((JAIS2,)),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    _STARCODER),
    "command-r": _P((r"\p{N}", GPT2), clean_spaces=False),
    "smollm": _P((r"\p{N}", GPT2), clean_spaces=False),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open",
                     "grok-2"), _QWEN2),
    "megrez": _P((QWEN2,)),
    "stablelm2": _P((QWEN2,)),
    "qwen35": _P((QWEN35,), clean_spaces=False),
    "dbrx": _DBRX,
    "smaug-bpe": _DBRX,
    "poro-chat": _P((_BLOOM,), clean_spaces=False),
    "bloom": _BLOOM_P,
    "gpt3-finnish": _BLOOM_P,
    "viking": _P((_BLOOM, r"\p{N}"), clean_spaces=False),
    **dict.fromkeys(("glm4", "chatglm-bpe"), _DBRX),  # llama.cpp: no default BOS, as here
    "tekken": _P((TEKKEN,), clean_spaces=False, ignore_merges=True, add_bos=True),
    "exaone-moe": _P((EXAONE_MOE,)),
    "chameleon": _P((r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                     r"([\t\n]|    |  )", r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]", GPT2),
                    clean_spaces=False, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "granite-embed-multi-97m": _P((GRANITE_MULTI,), clean_spaces=False, ignore_merges=True),
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _P((_TINY_AYA_DIGITS, TINY_AYA_WORDS),
                                                   clean_spaces=False)),
    "superbpe": _P((r"\p{N}+", _SUPERBPE_GROUPS), clean_spaces=False),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), _P((BAILINGMOE,),
                                                                   clean_spaces=False)),
    "seed-coder": _P((SEED_CODER,), clean_spaces=False),
    "kimi-k2": _P((KIMI_K2,), clean_spaces=False),
    "ufakzeka": _P((UFAKZEKA,), clean_spaces=False),
    "laguna": _P((r"[^\n]+|[\n]+", QWEN2), clean_spaces=False),
    "minicpm5": _P((r"\p{N}{1,3}", MINICPM5_WORDS), ignore_merges=True),
}
