from arvision.tokenizers.base import MissingExtra, MultiScaleTokenizer, TokenSpec, Tokenizer
from arvision.tokenizers.msvq import MultiScaleVQTokenizer
from arvision.tokenizers.rvq import RVQTokenizer
from arvision.tokenizers.vae import KLVAETokenizer
from arvision.tokenizers.vq import VQTokenizer

__all__ = ["KLVAETokenizer", "MissingExtra", "MultiScaleTokenizer", "MultiScaleVQTokenizer", "RVQTokenizer", "TokenSpec", "Tokenizer",
           "VQTokenizer"]
