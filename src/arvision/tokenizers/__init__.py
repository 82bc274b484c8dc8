from arvision.tokenizers.base import TokenSpec, Tokenizer
from arvision.tokenizers.msvq import MultiScaleVQTokenizer
from arvision.tokenizers.vae import KLVAETokenizer
from arvision.tokenizers.vq import VQTokenizer

__all__ = ["KLVAETokenizer", "MultiScaleVQTokenizer", "TokenSpec", "Tokenizer", "VQTokenizer"]
