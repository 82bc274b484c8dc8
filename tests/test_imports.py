"""What every official-checkpoint import shares: files read as data, state dicts found in every layout the official
files use, names mapped both ways without loss, and a file that does not fit named in one line."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.imports.base import (CheckpointMismatch, StateMap, file_sha256, find_state_dict, fit, nest,
                                   read_official, strip_prefixes)
from arvision.utils.files import UnreadableFile


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_an_official_file_with_a_pickled_namespace_is_read(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4, model="GPT-B"), "steps": 10}, path)
    obj = read_official(path)
    assert obj["args"].model == "GPT-B" and torch.equal(obj["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("where", ["top", "args", "nested"])
def test_an_official_file_that_would_run_code_is_refused_and_runs_nothing(where, tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    payload = {"top": RunsCode(marker), "args": {"model": {"w": torch.ones(1)}, "args": RunsCode(marker)},
               "nested": {"trainer": {"var_wo_ddp": {"w": torch.ones(1)}, "config": [RunsCode(marker)]}}}[where]
    torch.save(payload, path)
    with pytest.raises(UnreadableFile, match=r"evil\.pth holds the object (posix|os)\.system, which arvision does "
                                             r"not unpickle \(loading it could run code\)") as err:
        read_official(path)
    assert "\n" not in str(err.value) and not marker.exists()


def test_a_truncated_or_foreign_file_is_named(tmp_path):
    path = tmp_path / "var_d16.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UnreadableFile, match=r"var_d16\.pth cannot be read \(.*\): it is truncated or not a PyTorch"):
        read_official(path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnreadableFile, match="notes.txt"):
        read_official(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no file .*missing.pth: give the path"):
        read_official(tmp_path / "missing.pth")
    with pytest.raises(pickle.UnpicklingError):  # the gate is torch's own, not a text check
        torch.load(_evil(tmp_path), weights_only=True)


def _evil(tmp_path):
    path = tmp_path / "e.pt"
    torch.save(RunsCode(tmp_path / "x"), path)
    return path


@pytest.mark.parametrize("layout, keys, expected", [
    ("", ("model",), ""),                                             # a plain state dict (VAR, FlowAR, FSDP)
    ("model", ("model", "state_dict"), "model"),                      # LlamaGen DDP, MAR VAE, FlexVAE
    ("ema", ("ema", "model"), "ema"),                                 # EMA preferred when present
    ("state_dict_ema", ("state_dict_ema", "state_dict"), "state_dict_ema"),  # RQ-Transformer
    ("trainer.var_wo_ddp", ("trainer.var_wo_ddp",), "trainer.var_wo_ddp"),  # VAR / FlexVAR training checkpoints
])
def test_the_state_dict_is_found_in_every_official_layout(layout, keys, expected, tmp_path):
    state = {"module.blocks.0.w": torch.ones(2), "_orig_mod.head.b": torch.zeros(3)}
    obj = nest(state, layout)
    if isinstance(obj, dict) and layout:
        obj = {**obj, "steps": 5, "optimizer": {"state": {}}, "model": obj.get("model", {"other": torch.ones(1)})}
    found, where = find_state_dict(obj, tmp_path / "f.pt", keys)
    assert where == expected and set(found) == {"blocks.0.w", "head.b"}


def test_no_state_dict_is_named_with_the_top_level_keys(tmp_path):
    with pytest.raises(UnreadableFile, match=r"f\.pt: no state dict found \(top level: steps, args\); expected a "
                                             r"plain state dict or one under 'model'"):
        find_state_dict({"steps": 1, "args": argparse.Namespace()}, tmp_path / "f.pt", ("model",))


def test_wrapper_prefixes_go_in_any_order():
    assert list(strip_prefixes({"module._orig_mod.x": torch.ones(1), "_orig_mod.module.y": torch.ones(1)})) == \
        ["x", "y"]


VAR_LIKE = StateMap(pairs=[("encoder.down.{i}.block.{j}.{path}", "encoder.conv_blocks.{i}.res.{j}.{path}"),
                           ("decoder.up.3.{path}", "decoder.conv_blocks.0.{path}"),
                           ("quantize.quant_resi.qresi_ls.{k}.{path}", "quantize.quant_resi.{k}.{path}")],
                    official_only=["lvl_1L", "quantize.ema_vocab_hit_SV"])
NAMES = st.sampled_from(["encoder.down.{a}.block.{b}.conv1.weight", "encoder.down.{a}.block.{b}.norm.bias",
                         "decoder.up.3.block.{a}.conv2.weight", "quantize.quant_resi.qresi_ls.{a}.bias",
                         "head.weight", "blocks.{a}.attn.mat_qkv.weight", "lvl_1L", "quantize.ema_vocab_hit_SV"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(NAMES, st.integers(0, 11), st.integers(0, 3)), min_size=1, max_size=12, unique=True))
def test_names_map_both_ways_without_loss(names):
    official = {template.format(a=a, b=b): torch.full((2,), float(n)) for n, (template, a, b) in enumerate(names)}
    ours, extras = VAR_LIKE.to_ours(official)
    assert set(extras) <= {"lvl_1L", "quantize.ema_vocab_hit_SV"}
    assert len(ours) + len(extras) == len(official)  # no two official names collapse into one
    back = VAR_LIKE.to_official(ours, extras)
    assert set(back) == set(official) and all(back[k] is official[k] for k in official)


def test_templates_rename_indices_and_dotted_tails():
    assert VAR_LIKE.ours("encoder.down.2.block.1.nin_shortcut.weight") == \
        "encoder.conv_blocks.2.res.1.nin_shortcut.weight"
    assert VAR_LIKE.official("decoder.conv_blocks.0.attn.1.q.weight") == "decoder.up.3.attn.1.q.weight"
    assert VAR_LIKE.ours("encoder.downs.2.block.1.w") == "encoder.downs.2.block.1.w"  # no pair: unchanged


def test_a_file_that_does_not_fit_is_named_in_one_line_with_what_differs(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    state = {"0.weight": torch.zeros(8, 4), "0.bias": torch.zeros(8), "1.weight": torch.zeros(2, 16),
             "2.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatch) as err:
        fit(model, state, path=tmp_path / "c2i_B_256.pt", preset="llamagen_c2i_b_256")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'c2i_B_256.pt'} does not fit official=llamagen_c2i_b_256 (Sequential): ")
    assert "1 missing (1.bias)" in message and "1 unexpected (2.weight)" in message
    assert "1 of another shape (1.weight 2×16 in the file, 2×8 in the model)" in message
    assert torch.equal(model[1].weight, model[1].weight)  # untouched: nothing was loaded
    good = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    fit(model, good, path=tmp_path / "ok.pt", preset="x")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())


def test_mismatches_are_named_as_the_official_file_names_them(tmp_path):
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    model.encoder.conv_blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.encoder.conv_blocks[0].res = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(CheckpointMismatch, match=r"2 missing \(encoder\.down\.0\.block\.0\.weight, "
                                                 r"encoder\.down\.0\.block\.0\.bias\)"):
        fit(model, {}, path=tmp_path / "vae.pth", preset="var_d16", official_names=VAR_LIKE)


def test_file_hashes_are_sha256_of_the_bytes(tmp_path):
    import hashlib
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (1 << 20) + b"tail")
    assert file_sha256(path, chunk=4096) == hashlib.sha256(path.read_bytes()).hexdigest()
