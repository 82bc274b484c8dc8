from arvision.tokenizers.base import TokenSpec, Tokenizer
from arvision.tokenizers.vq import VQTokenizer

__all__ = ["TokenSpec", "Tokenizer", "VQTokenizer"]
