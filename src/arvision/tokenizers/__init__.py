from arvision.tokenizers.base import MissingExtra, TokenSpec, Tokenizer
from arvision.tokenizers.msvq import MultiScaleVQTokenizer
from arvision.tokenizers.rvq import RVQTokenizer
from arvision.tokenizers.vae import KLVAETokenizer
from arvision.tokenizers.vq import VQTokenizer

__all__ = ["KLVAETokenizer", "MissingExtra", "MultiScaleVQTokenizer", "RVQTokenizer", "TokenSpec", "Tokenizer",
           "VQTokenizer"]
