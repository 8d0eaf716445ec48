"""flexinfer: run GGUF language models on CPUs with less memory than the model.

    import flexinfer
    with flexinfer.load("model.gguf", memory_budget="1.5GiB") as model:
        for piece in model.generate("Hello", max_tokens=16):
            print(piece.text, end="")
"""

from flexinfer.errors import FlexInferError, GGUFError, StreamError

__all__ = ["load", "FlexInferError", "GGUFError", "StreamError"]


def load(path, **options):
    """Load a GGUF model; see flexinfer.model.Options for the options."""
    from flexinfer.model import load as _load
    return _load(path, **options)
