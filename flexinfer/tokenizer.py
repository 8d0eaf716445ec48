"""Text <-> token ids from a GGUF file's tokenizer metadata, matching llama.cpp's tokenizer.

Two vocabularies are supported, as `tokenizer.ggml.model` names them:
  "llama"  SentencePiece BPE: spaces become U+2581, a space is put before the text, pairs of
           symbols merge by the score of the token they form, unknown characters fall back to
           <0xNN> byte tokens.
  "gpt2"   byte-level BPE: the text is split by the `tokenizer.ggml.pre` regexes (pretokenize.py),
           each byte becomes one printable character (GPT-2's table), pieces merge by
           `tokenizer.ggml.merges` rank.
The merging runs in the HuggingFace `tokenizers` library (Rust). For SentencePiece the merge list
is derived from the scores: every split of a token into two tokens is a merge, ranked by the score
of the token it forms, which is the order llama.cpp merges in.

Special tokens are cut out of the text before merging, as llama.cpp does (tokenizer_st_partition):
user-defined tokens (token_type 4) always, control tokens (3) and <unk> (2) only when parse_special
is set, longest text first. Decoding follows llama.cpp's token_to_piece/detokenize: control tokens
render as nothing, the first token loses its leading space when the vocabulary adds one, and the
families with clean_spaces drop the space before ? ! . , and 's 'm 're 've.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from flexinfer.errors import FlexInferError, GGUFError
from flexinfer.gguf_file import GGUFFile
from flexinfer.pretokenize import PRE_TOKENIZERS, PreTokenizer, splitters

# tokenizer.ggml.token_type values (llama.h llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"  # SentencePiece's visible space
_C_SPACE = " \t\n\v\f\r"  # C isspace(), used by rstrip
_K = "tokenizer.ggml."

# Token texts that end generation whatever their type; llama.cpp makes them control tokens
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~["))
# When the file names no EOT/EOM/FIM token, the first token with one of these texts is taken
_FOUND_BY_TEXT = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
            "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# gpt-oss renders these in its output, so llama.cpp makes them user-defined
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) to U+0100 upwards, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(0x100 + n)
    return table


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# str.translate table from byte-level characters back to chr(byte), for .encode("latin-1")
_BYTE_DECODE = {ord(c): chr(b) for b, c in bytes_to_unicode().items()}


@dataclass(frozen=True)
class Vocab:
    """The tokenizer metadata of one GGUF file, read and checked in one place."""

    path: str  # the GGUF file, for error messages
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre; "default" when absent; "" for SentencePiece
    tokens: list[str]  # id -> text; an empty text becomes "[EMPTY_<id>]" like llama.cpp
    scores: np.ndarray  # float32 per token; SentencePiece merge priority (zeros when absent)
    types: np.ndarray  # int32 per token, NORMAL..BYTE (all NORMAL when absent)
    merges: list[str]  # "left right" per merge, rank order; empty for SentencePiece
    ids: dict[str, int | None]  # "bos", "eos", "unk", "pad", "eot", "eom", "sep", "fim_*" -> id
    add_bos: bool  # put BOS first when encoding (default: True for llama, per pre for gpt2)
    add_eos: bool  # put EOS last when encoding (default False)
    add_space_prefix: bool  # SentencePiece: put a space before the text (default: True for llama)
    name: str  # general.name, lower case (llama.cpp keys a phi-3 quirk on it)


def _fail(path: str, what: str):
    raise GGUFError(path, what)


def _get(md: dict, path: str, key: str, kind, default=None):
    v = md.get(_K + key, default)
    if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
        _fail(path, f"{_K}{key}: expected {kind.__name__}, got {type(v).__name__} {v!r:.60}")
    return v


def _array(md: dict, path: str, key: str, dtypes: tuple[str, ...], n: int):
    v = md.get(_K + key)
    if v is None:
        return None
    if not isinstance(v, np.ndarray) or v.dtype.name not in dtypes:
        got = v.dtype.name if isinstance(v, np.ndarray) else type(v).__name__
        _fail(path, f"{_K}{key}: expected an array of {' or '.join(dtypes)}, got {got}")
    if len(v) != n:
        _fail(path, f"{_K}{key}: has {len(v)} entries but tokenizer.ggml.tokens has {n}")
    return v


def _strings(md: dict, path: str, key: str) -> list[str] | None:
    v = md.get(_K + key)
    if v is not None and not (isinstance(v, list) and all(type(s) is str for s in v)):
        _fail(path, f"{_K}{key}: expected an array of strings, got {type(v).__name__}")
    return v


def _special_ids(md: dict, path: str, model: str, n: int) -> dict[str, int | None]:
    # llama.cpp's defaults for SentencePiece; byte-level files name their own
    ids = {"bos": 1, "eos": 2, "unk": 0} if model == "llama" else {}
    ids = {k: (v if v < n else None) for k, v in ids.items()}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id"), ("eot", "eot_token_id"), ("eom", "eom_token_id"),
                      ("sep", "seperator_token_id"), ("fim_pad", "fim_pad_token_id"),
                      ("fim_rep", "fim_rep_token_id"), ("fim_sep", "fim_sep_token_id")):
        v = _get(md, path, key, int)
        if v is not None and not 0 <= v < n:
            _fail(path, f"{_K}{key}: id {v} is outside the vocabulary of {n} tokens")
        ids[name] = v if v is not None else ids.get(name)
    return ids


def read_vocab(md: dict, path: str) -> Vocab:
    """Reads and checks the tokenizer metadata of the file at path; every fault is a GGUFError
    naming the key."""
    model = _get(md, path, "model", str)
    if model not in ("llama", "gpt2"):
        _fail(path, f"{_K}model {model!r} is not supported (only 'llama' and 'gpt2')")
    tokens = _strings(md, path, "tokens")
    if not tokens:
        _fail(path, f"{_K}tokens: missing or empty")
    n = len(tokens)
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    scores = _array(md, path, "scores", ("float32", "int32"), n)
    types = _array(md, path, "token_type", ("int32",), n)
    merges = _strings(md, path, "merges") or []
    pre = _get(md, path, "pre", str, "default") if model == "gpt2" else ""
    if model == "gpt2" and not merges and pre != "kimi-k2":
        _fail(path, f"{_K}merges: missing, and a 'gpt2' vocabulary needs its merges")
    ids = _special_ids(md, path, model, n)
    family = PRE_TOKENIZERS.get(pre)
    default_bos = model == "llama" or bool(family and family.add_bos)
    default_bos = default_bos and ids.get("bos") is not None
    add_bos = _get(md, path, "add_bos_token", bool, default_bos)
    add_eos = _get(md, path, "add_eos_token", bool, False)
    for flag, which in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids.get(which) is None:  # only when the file asks for it
            _fail(path, f"{_K}add_{which}_token is true but {_K}{which}_token_id is not set")
    return Vocab(
        path=path, model=model, pre=pre, tokens=tokens,
        scores=np.zeros(n, np.float32) if scores is None else scores.astype(np.float32),
        types=np.full(n, NORMAL, np.int32) if types is None else types, merges=merges, ids=ids,
        add_bos=add_bos, add_eos=add_eos,
        add_space_prefix=_get(md, path, "add_space_prefix", bool, model == "llama"),
        name=str(md.get("general.name", "")).lower())


def _token_index(v: Vocab) -> dict[str, int]:
    index = {t: i for i, t in enumerate(v.tokens)}
    if len(index) != len(v.tokens):
        seen: dict[str, int] = {}
        for i, t in enumerate(v.tokens):
            if t in seen:
                _fail(v.path, f"{_K}tokens: {t!r:.40} appears twice (ids {seen[t]} and {i})")
            seen[t] = i
    return index


def _pre_tokenizer(v: Vocab) -> PreTokenizer | None:
    if v.model == "llama":
        return None
    if v.pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise FlexInferError(f"{v.path}: {_K}pre {v.pre!r} is not supported (known: {known})")
    return PRE_TOKENIZERS[v.pre]


def _spm_merges(v: Vocab, index: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score of the formed token first. llama.cpp's
    SentencePiece merges the adjacent pair forming the highest-scoring token; equal scores go left
    first there, by split position here (only differs when two such merges overlap)."""
    found = []
    for tid, tok in enumerate(v.tokens):
        for k in range(1, len(tok)):
            if tok[:k] in index and tok[k:] in index:
                found.append((-float(v.scores[tid]), tid, k))
    found.sort()
    return [(v.tokens[t][:k], v.tokens[t][k:]) for _, t, k in found]


def _bpe_merges(v: Vocab) -> list[tuple[str, str]]:
    """'left right' strings as pairs; llama.cpp splits at the first space after the first byte."""
    pairs = [tuple(m.split(" ", 1)) for m in v.merges]
    for i, p in enumerate(pairs):
        if len(p) != 2 or not p[0]:
            cut = v.merges[i].find(" ", 1)
            pairs[i] = (v.merges[i][:cut], v.merges[i][cut + 1:]) if cut > 0 else ("", "")
    return pairs


def _bpe_model(v: Vocab, index: dict[str, int], merges: list[tuple[str, str]], **kw) -> models.BPE:
    try:
        return models.BPE(vocab=index, merges=merges, **kw)
    except Exception:  # a merge of tokens the vocabulary lacks: llama.cpp cannot use it either
        ok = [(a, b) for a, b in merges if a in index and b in index and a + b in index]
    try:
        return models.BPE(vocab=index, merges=ok, **kw)
    except Exception as e:
        raise GGUFError(v.path, f"{_K}tokens: cannot build a BPE model from them ({e})") from None


def _build_hf(v: Vocab, pre: PreTokenizer | None, index: dict[str, int]) -> HFTokenizer:
    if pre is None:  # SentencePiece: the whole fragment is one word; bytes for unknown characters
        unk = v.tokens[v.ids["unk"]] if v.ids.get("unk") is not None else None
        return HFTokenizer(_bpe_model(v, index, _spm_merges(v, index), byte_fallback=True,
                                      unk_token=unk))
    hf = HFTokenizer(_bpe_model(v, index, _bpe_merges(v), ignore_merges=pre.ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [*splitters(pre), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return hf


def _first_with_text(index: dict[str, int], texts) -> int | None:
    found = [index[t] for t in texts if t in index]
    return min(found) if found else None


def _end_of_generation(v: Vocab, index: dict[str, int], types: np.ndarray) -> tuple[dict, set]:
    """llama.cpp's EOG set: EOS, EOT, EOM, the FIM pad/repo/sep ids and the EOG_TEXTS tokens.
    EOT/EOM/FIM ids the file does not give are found by text; every token found by its text
    becomes a control token (types is changed in place), as llama.cpp does."""
    ids, by_text = dict(v.ids), {index[t] for t in EOG_TEXTS if t in index}
    for name, texts in _FOUND_BY_TEXT.items():
        if ids.get(name) is None:
            ids[name] = _first_with_text(index, texts)
            by_text |= {ids[name]} - {None}
    types[list(by_text)] = CONTROL
    eog = {index[t] for t in EOG_TEXTS if t in index}
    eog |= {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep", "eos", "eot", "eom")
            if ids[k] is not None}
    for t in _ALWAYS_RENDERED:
        if t in index:
            types[index[t]] = USER_DEFINED
    has = {t for t in ("<|return|>", "<|call|>", "<|calls|>", "<|flush|>", "<|end|>",
                       "<|tool_response>", "</s>") if t in index and index[t] in eog}
    if {"<|return|>", "<|call|>", "<|end|>"} <= has or {"<|calls|>", "<|flush|>", "<|end|>"} <= has:
        eog.discard(index["<|end|>"])  # harmony formats: <|end|> ends a message, not the turn
        types[index["<|end|>"]] = USER_DEFINED
    if {"<|tool_response>", "</s>"} <= has:
        eog.discard(index["</s>"])  # gemma4 and paddleocr
        types[index["</s>"]] = NORMAL
    return ids, eog


def _is_phi3(name: str) -> bool:
    """llama.cpp keys phi-3's special-token whitespace rule on general.name."""
    return "phi-3" in name or "phi3" in name


class Tokenizer:
    """encode/decode for one GGUF vocabulary; build it with Tokenizer.from_gguf(g)."""

    def __init__(self, v: Vocab):
        index = _token_index(v)
        self._pre = _pre_tokenizer(v)
        self._spm = v.model == "llama"
        self._hf = _build_hf(v, self._pre, index)
        self._types = v.types.copy()
        ids, eog = _end_of_generation(v, index, self._types)
        self.path, self.model, self.pre, self.tokens = v.path, v.model, v.pre, v.tokens
        self.n_vocab = len(v.tokens)  # number of token ids
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]  # None when the vocabulary has none
        self.eot_id, self.eom_id, self.unk_id = ids["eot"], ids["eom"], ids["unk"]
        self.eog_ids: frozenset[int] = frozenset(eog)  # ids that end generation
        self.add_bos, self.add_eos = v.add_bos, v.add_eos  # what encode() adds by default
        self.add_space_prefix = v.add_space_prefix  # SentencePiece: space before the text
        self.clean_spaces = self._pre.clean_spaces if self._pre else False
        self._specials, self._user_specials = self._special_lists()
        self._rstrip = self._phi3_rstrip(index) if _is_phi3(v.name) else frozenset()
        self._pieces: dict[tuple[int, bool], bytes] = {}

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> Tokenizer:
        return cls(read_vocab(g.metadata, g.path))

    @classmethod
    def from_metadata(cls, metadata: dict, path: str = "<metadata>") -> Tokenizer:
        """From GGUF-style metadata (tokenizer.ggml.* keys); path only names it in errors."""
        return cls(read_vocab(metadata, path))

    def _special_lists(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(text, id) of tokens cut out before merging, longest text first: all special kinds
        for parse_special, user-defined only otherwise."""
        kinds = np.isin(self._types, (UNKNOWN, CONTROL, USER_DEFINED))
        found = sorted(((self.tokens[i], int(i)) for i in np.nonzero(kinds)[0]),
                       key=lambda p: (-len(p[0].encode()), p[1]))
        return found, [p for p in found if self._types[p[1]] == USER_DEFINED]

    def _phi3_rstrip(self, index: dict[str, int]) -> frozenset[int]:
        """Special tokens after which whitespace is dropped: llama.cpp does this for phi-3."""
        strip = {i for _, i in self._specials} | ({index["</s>"]} if "</s>" in index else set())
        keep = {index[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in index}
        return frozenset(strip - keep)

    # -- encoding --------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of text. add_bos None follows the file (tokenizer.ggml.add_bos_token) and so
        does add_eos None, unless add_bos is False: then neither is added (llama.cpp's
        add_special=False). parse_special: control tokens' texts become their ids (chat prompts);
        without it only user-defined tokens do, as in llama.cpp."""
        bos = self.add_bos if add_bos is None else add_bos
        eos = (self.add_eos and add_bos is not False) if add_eos is None else add_eos
        ids = [self._need("bos")] if bos else []
        for frag in self._partition(_valid_utf8(text), parse_special):
            if isinstance(frag, int):
                ids.append(frag)
            else:
                ids.extend(self._encode_plain(frag))
        return ids + [self._need("eos")] if eos else ids

    def _need(self, which: str) -> int:
        tid = getattr(self, f"{which}_id")
        if tid is None:
            raise FlexInferError(f"{self.path}: the vocabulary has no {which.upper()} token")
        return tid

    def _encode_plain(self, text: str) -> list[int]:
        if self._spm:  # SentencePiece: a space before every fragment, spaces as U+2581
            text = (" " + text if self.add_space_prefix else text).replace(" ", SPM_SPACE)
        return self._hf.encode(text, add_special_tokens=False).ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cuts special tokens' texts out of text, longest first, as llama.cpp does."""
        frags: list[str | int] = [text] if text else []
        for tok, tid in (self._specials if parse_special else self._user_specials):
            if any(isinstance(f, str) and tok in f for f in frags):
                frags = self._cut(frags, tok, tid)
        return frags

    def _cut(self, frags: list[str | int], tok: str, tid: int) -> list[str | int]:
        out: list[str | int] = []
        for f in frags:
            if isinstance(f, int) or tok not in f:
                out.append(f)
                continue
            for k, part in enumerate(f.split(tok)):
                if k:
                    out.append(tid)
                    part = part.lstrip(_C_SPACE) if tid in self._rstrip else part
                if part:
                    out.append(part)
        return out

    # -- decoding --------------------------------------------------------------------------

    def token_bytes(self, tid: int, special: bool = True) -> bytes:
        """The bytes token tid stands for (llama.cpp token_to_piece). special=False renders control
        and unknown tokens as nothing; unused tokens are always nothing."""
        key = (tid, special)
        piece = self._pieces.get(key)
        if piece is None:
            if not 0 <= tid < self.n_vocab:
                raise FlexInferError(f"token id {tid} is outside the vocabulary of "
                                     f"{self.n_vocab} tokens")
            piece = self._pieces[key] = self._piece(tid, special)
        return piece

    def _piece(self, tid: int, special: bool) -> bytes:
        kind, text = int(self._types[tid]), self.tokens[tid]
        if kind in (CONTROL, UNKNOWN):
            return text.encode() if special else b""
        if kind == USER_DEFINED:
            return text.encode()
        if kind == BYTE and _BYTE_TOKEN.fullmatch(text):  # "<0xNN>"
            return bytes([int(text[3:5], 16)])
        if kind != NORMAL:
            return b""
        if self._spm:
            return text.replace(SPM_SPACE, " ").encode()
        return _byte_level_decode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ids, as llama.cpp's detokenize without rendering special tokens: the first token
        loses one leading space when the vocabulary adds a space prefix; invalid UTF-8 -> U+FFFD."""
        raw = b"".join(self.token_bytes(t, special=False) for t in ids)
        if ids and self.add_space_prefix and self.token_bytes(ids[0], False).startswith(b" "):
            raw = raw[1:]
        text = raw.decode("utf-8", errors="replace")
        return _clean_spaces(text) if self.clean_spaces else text


def _valid_utf8(text: str) -> str:
    """Lone surrogates (from undecodable input) become U+FFFD, as llama.cpp treats invalid UTF-8."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _byte_level_decode(text: str) -> bytes:
    try:
        return text.translate(_BYTE_DECODE).encode("latin-1")
    except UnicodeEncodeError:  # a character outside GPT-2's table: keep it as UTF-8
        return b"".join(c.translate(_BYTE_DECODE).encode("latin-1") if ord(c) in _BYTE_DECODE
                        else c.encode() for c in text)


def _clean_spaces(text: str) -> str:
    """llama.cpp's three clean-up passes: " ?" " !" " ." " ," lose the space, " ' " becomes "'",
    and " 's" " 'm" " 're" " 've" lose the space."""
    text = re.sub(r" (?=[?!.,])", "", text)
    text = text.replace(" ' ", "'")
    return re.sub(r" '(?=s|m|re|ve)", "'", text)


class StreamDecoder:
    """Turns generated token ids into text as they come: feed() returns only complete UTF-8, holding
    back a multi-byte character split across tokens (e.g. an emoji as <0xF0><0x9F><0x98><0x80>)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tid: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(tid, special=False))

    def flush(self) -> str:
        """What is left at the end; an incomplete character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
