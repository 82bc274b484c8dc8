"""FSQ / LFQ tokenizers behind the Tokenizer contract (optional extra arvision[vqp])."""

import builtins
import math

import pytest
import torch

from arvision.tokenizers.base import MissingExtra

pytest.importorskip("vector_quantize_pytorch", reason="optional extra: pip install 'arvision[vqp]'")

from arvision.tokenizers.lookup_free import LookupFreeTokenizer  # noqa: E402


def make(method: str, **kw) -> LookupFreeTokenizer:
    args = dict(image_size=16, image_channels=1, method=method, ch=8, ch_mult=(1, 2, 2), z_channels=8)
    args.update(kw)
    return LookupFreeTokenizer(**args)


@pytest.mark.parametrize("method,kw,vocab,dim", [("fsq", {"levels": (8, 5, 5)}, 200, 3),
                                                 ("lfq", {"codebook_size": 64}, 64, 6)])
def test_spec_round_trip_and_index_range(method, kw, vocab, dim):
    tok = make(method, **kw).eval()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    tokens = tok.encode(images)
    assert tok.spec.vocab_size == vocab and tok.spec.dim == dim and tok.spec.grid == (4, 4)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < vocab
    recon = tok.decode(tokens)
    assert recon.shape == images.shape and -1 <= recon.min() and recon.max() <= 1
    assert torch.allclose(recon, tok(images)["recon"].clamp(-1, 1), atol=1e-5)  # decode(encode) = forward


def test_fsq_indices_enumerate_the_level_grid_exactly_once():
    tok = make("fsq", levels=(4, 3))
    all_indices = torch.arange(12).view(1, 3, 4)
    codes = tok.quantize.indices_to_codes(all_indices)
    # Each index maps to a distinct code whose per-channel values lie on that channel's level grid.
    flat = codes.permute(0, 2, 3, 1).reshape(-1, 2)
    assert len({tuple(c.tolist()) for c in flat}) == 12
    assert flat.abs().max() <= 1.0  # codes are normalised to [-1, 1]
    for channel, levels in enumerate((4, 3)):
        assert len(flat[:, channel].unique()) == levels  # channel c takes exactly levels[c] values


def test_lfq_entropy_term_is_part_of_the_loss_and_gradients_reach_the_encoder():
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    aux = {}
    for weight in (0.0, 0.1, 0.2):  # no commitment term: the auxiliary loss is the weighted entropy term alone
        torch.manual_seed(0)
        tok = make("lfq", codebook_size=16, entropy_weight=weight, commitment_weight=0.0)
        out = tok(images)
        aux[weight] = out["aux_loss"].item()
    assert aux[0.0] == 0.0 and aux[0.1] != 0.0
    assert math.isclose(aux[0.2], 2 * aux[0.1], rel_tol=1e-5)  # linear in entropy_weight
    assert math.isclose(out["loss"].item(), (out["recon_loss"] + out["aux_loss"]).item(), rel_tol=1e-6)
    out["loss"].backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


def test_lfq_rejects_codebooks_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        make("lfq", codebook_size=100)


def test_missing_extra_gives_an_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_vqp(name, *args, **kwargs):
        if name.startswith("vector_quantize_pytorch"):
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vqp)
    with pytest.raises(MissingExtra, match=r"pip install 'arvision\[vqp\]'"):
        make("fsq")
