"""FlowAR's official files (arvision.imports.flowar): parity with the official code from the golden fixture,
arvision-import → arvision-sample → arvision-eval end to end on random-weight official-layout files, the export round
trip in both layouts, wrong files named in one line, and presets that build FlowAR-S, -L and -H."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from arvision import pipeline
from arvision.cli import evaluate as evaluate_cli
from arvision.cli import sample as sample_cli
from arvision.generators.flowar import FlowARGenerator
from arvision.imports.base import CheckpointMismatch, read_official
from arvision.imports.flowar import GENERATOR_NAMES, FlowARCheckpoints, flowar_buffers
from arvision.imports.runs import export_official, import_official
from arvision.tokenizers.kl16 import KL16Tokenizer
from arvision.utils.instantiate import instantiate
from tests.conftest import REPO, compose_config, compose_import, run_import_cli

FIXTURE = REPO / "tests" / "fixtures" / "parity" / "flowar.pt"
PRESET = "flowar_s"
# the fixture's tokenizer side: MAR's KL-16 narrowed to 32-px images → 16×16×16 latents (FlowAR's fixed latent)
VAE = dict(image_size=32, image_channels=3, ch=32, ch_mult=(1, 1), num_res_blocks=1, embed_dim=16)
# a tiny random FlowAR for the end-to-end run: 10 classes of 32-px shapes
E2E = ["data=shapes", "data.image_size=32", "data.channels=3", "data.num_classes=10", "tokenizer.model.ch=32",
       "tokenizer.model.ch_mult=[1,1]", "tokenizer.model.num_res_blocks=1", "generator.model.dim=16",
       "generator.model.depth=1", "generator.model.heads=2", "generator.model.head_width=64",
       "generator.model.head_depth=1", "generator.model.head_heads=1"]


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def official_mask(scales: list[int]) -> torch.Tensor:
    """FlowAR's `mask` buffer, built here as FlowAR.__init__ builds it: row block k sees columns up to its end."""
    total = sum(s * s for s in scales)
    rows, end = [], 0
    for s in scales:
        end += s * s
        rows.append(torch.cat([torch.zeros(s * s, end), torch.full((s * s, total - end), float("-inf"))], dim=1))
    return torch.cat(rows)[None, None]


def kl16_file(tmp_path: Path, seed: int = 0) -> Path:
    """A random-weight KL-16 in kl16.ckpt's layout ({"model": …}, MAR's names)."""
    torch.manual_seed(seed)
    tokenizer = KL16Tokenizer(**VAE)
    state = FlowARCheckpoints().tokenizer_to_official(tokenizer.state_dict(), {}, tokenizer)
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": state}, path)
    return path


def fixture_generator(fx: dict, head: str) -> dict[str, torch.Tensor]:
    state = fx[head]["generator"]
    return {**{k: state[k] for k in list(state)[:3]}, "mask": official_mask([1, 2, 4, 8, 16]),
            **{k: state[k] for k in list(state)[3:]}}  # FlowAR's order: the three tables, then its mask


def do_import(tmp_path: Path, files: tuple[Path, Path], overrides: list[str], *extra: str, run: str = "run"
              ) -> pipeline.FinishedRun:
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={files[0]}", f"generator_file={files[1]}",
                          *overrides, *extra], tmp_path)
    import_official(cfg, tmp_path / run)
    return pipeline.load_run(tmp_path / run)


def replayed_noise(seed: int, rows: int, scales: list[int], steps: int, sde: bool) -> list[tuple]:
    """The draws FlowAR's sample_tokens makes after torch.manual_seed(seed): per scale its initial noise, then one
    float64 randn_like per noisy SDE step."""
    torch.manual_seed(seed)
    return [(torch.randn(rows, s * s, 16),
             [torch.randn(rows, s * s, 16, dtype=torch.float64) for _ in range(steps - 1)] if sde else [])
            for s in scales]


def sampled_latents(generator: FlowARGenerator, labels: torch.Tensor, *, steps: int, sde: bool, seed: int,
                    cfg: float, guidance: float, **kw) -> torch.Tensor:
    """Every scale's latent (B, 341, 16) of a sampling run on FlowAR's replayed draws (their conditional rows)."""
    rows = labels.shape[0]
    draws = replayed_noise(seed, 2 * rows, generator.scales, steps, sde)
    latents: list[torch.Tensor] = []
    sample = generator.process.sample

    def spy(*args, **kwargs):
        out = sample(*args, **kwargs)
        latents.append(out.sample)
        return out

    generator.process.sample = spy
    try:
        generator.sample(labels, cfg=cfg, steps=steps, guidance_high=guidance,
                         sampler="euler_maruyama" if sde else "euler", noise=[d[0][:rows] for d in draws],
                         step_noise=[[n[:rows] for n in d[1]] for d in draws] if sde else None, **kw)
    finally:
        del generator.process.sample
    return torch.cat(latents, dim=1)


# --------------------------------------------------------------------------------------------- (a) golden fixture
@pytest.mark.parametrize("head", ["spatial", "cross"])
def test_golden_fixture_outputs_equal_the_official_code(head, tmp_path, fixture):
    """The fixture holds official-layout FlowAR state dicts (the official class, seeded random weights; FlowAR-S's
    spatial head and L/H's cross head), inputs and the official code's outputs (experiments/parity/flowar.py
    --fixture at `official_commit`); the import reproduces every one of them."""
    fx = fixture
    gen_file = tmp_path / "FlowAR-S.pth"
    torch.save(fixture_generator(fx, head), gen_file)
    run = do_import(tmp_path, (kl16_file(tmp_path), gen_file), fx[head]["overrides"])
    generator = run.generator.eval()
    inputs, official, tol = fx["inputs"], fx[head]["official"], fx[head]["tolerance"]
    cfg, guidance = fx["settings"]["cfg"], fx["settings"]["guidance"]
    ours = {}
    with torch.no_grad():
        z = generator(inputs["latents"], inputs["labels"])[0]
        if "conditions z (teacher-forced)" in official:  # the head then reads FlowAR's z, as the harness did
            ours["conditions z (teacher-forced)"], z = z, official["conditions z (teacher-forced)"]
        ours["velocity"] = generator.velocity(inputs["x_t"], inputs["t"][:, generator.segments], z,
                                              attn_mask=generator.head_mask)
    for name, (steps, sde) in fx["sampling_runs"].items():
        key = f"{name}: latents of every scale"
        if key in official:
            ours[key] = sampled_latents(generator, inputs["sample_labels"], steps=steps, sde=sde,
                                        seed=fx["seed"] + steps + int(sde), cfg=cfg, guidance=guidance)
    assert set(ours) == set(official)  # every recorded official output is checked
    for name, theirs in official.items():
        assert (ours[name] - theirs).abs().max().item() <= tol[name], name
    # the fixture is one a wrong guidance schedule fails: a constant weight instead of FlowAR's ramp
    wrong = sampled_latents(generator, inputs["sample_labels"], steps=25, sde=False, seed=fx["seed"] + 25, cfg=cfg,
                            guidance=guidance, cfg_schedule="constant")
    assert (wrong - official["euler 25 steps (flowar grid): latents of every scale"]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- (b) end to end
def random_flowar_file(tmp_path: Path, name: str = "FlowAR-S.pth", *, seed: int = 0, **model) -> tuple[Path, dict]:
    """A random-weight tiny FlowAR of 10 classes in FlowAR's layout (its names, order and buffers)."""
    torch.manual_seed(seed)
    kw = dict(dim=16, depth=1, heads=2, head_width=64, head_depth=1, head_heads=1, **model)
    generator = FlowARGenerator(spec=KL16Tokenizer(**VAE).spec, num_classes=10, **kw)
    family = FlowARCheckpoints()
    state = family.generator_to_official(generator.state_dict(), flowar_buffers(generator), generator)
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def test_import_cli_then_sample_and_eval_the_imported_run(tmp_path, capsys):
    gen_file, _ = random_flowar_file(tmp_path)
    run = tmp_path / "imported"
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={kl16_file(tmp_path)}",
                          f"generator_file={gen_file}", *E2E, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert f"imported official={PRESET}" in done.stdout and f"arvision-sample run={run}" in done.stdout
    record = json.loads((run / "results.json").read_text())
    imported = record["imported"]
    assert imported["family"] == "flowar" and imported["preset"] == PRESET
    assert imported["files"]["tokenizer"]["layout"] == "model" and imported["files"]["generator"]["layout"] == ""
    assert imported["published"]["fid"] == 3.61 and "paper" in imported["published"]["source"]
    sample = record["config"]["generator"]["sample"]  # the README's evaluation command
    assert {k: sample[k] for k in ("cfg", "steps", "sampler", "time_grid", "guidance_high", "cfg_schedule")} == {
        "cfg": 4.3, "steps": 25, "sampler": "euler", "time_grid": "flowar", "guidance_high": 0.9,
        "cfg_schedule": "linear"}

    out = tmp_path / "samples.npz"
    sample_cli.main.__wrapped__(compose_config("sample", [f"run={run}", "num_samples=10", "batch_size=5",
                                                          f"out={out}", "+sample.steps=4"], tmp_path))
    assert capsys.readouterr().out.startswith(f"wrote {out}: 10 samples")
    npz = np.load(out)
    assert npz["arr_0"].shape == (10, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    evaluate_cli.main.__wrapped__(compose_config("eval", [
        f"run={run}", "metrics.num_samples=10", "metrics.num_reference=40", "metrics.batch_size=10",
        "metrics.latency_batch_size=null", "metrics.classifier.epochs=0.1", "select=[fid,accuracy]",
        "+sample.steps=4"], tmp_path))
    evaluation = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert np.isfinite(evaluation["metrics"]["fid"]["value"]) and evaluation["metrics"]["fid"]["num_samples"] == 10
    assert 0.0 <= evaluation["metrics"]["accuracy"]["value"] <= 1.0


# --------------------------------------------------------------------------------------------- (c) round trip
@pytest.mark.parametrize("layout", ["plain", "training"])
def test_export_writes_the_official_file_back(layout, tmp_path):
    gen_file, state = random_flowar_file(tmp_path, head="cross")
    if layout == "training":  # main_flowar.py's checkpoint: the EMA copy is what the import reads
        ema = {k: v + 1 if v.is_floating_point() and k != "mask" and "rope" not in k else v for k, v in state.items()}
        torch.save({"model": state, "model_ema": ema, "optimizer": {}, "epoch": 3, "scaler": {}}, gen_file)
        state = ema
    run = do_import(tmp_path, (kl16_file(tmp_path), gen_file), E2E + ["generator.model.head=cross"])
    assert torch.equal(run.generator.head_pos_embed, state["diffusion_pos_embed_learned"])
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert [p.name for p in written] == ["kl16.ckpt", "FlowAR-S.pth"]
    back = read_official(written[1])
    if layout == "training":
        assert list(back) == ["model_ema"]
        back = back["model_ema"]
    assert list(back) == list(state)  # FlowAR's names in FlowAR's order, its buffers included
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_names_map_by_renaming_alone():
    names = GENERATOR_NAMES
    assert names.ours("encoder_blocks.3.attn.qkv.bias") == "layers.3.attention.wqkv.bias"
    assert names.ours("decoder_blocks.0.mlp.fc1_g.weight") == "decoder_layers.0.feed_forward.fc1_g.weight"
    assert names.ours("decoder_blocks.0.ada_lin.1.weight") == "decoder_layers.0.ada_lin.1.weight"
    assert names.ours("flownet.res_blocks.5.crossattn.kv.weight") == "head.blocks.5.crossattn.kv.weight"
    assert names.ours("flownet.final_layer.adaLN_modulation.1.bias") == "head.final_ada.bias"
    assert names.ours("flownet.time_embed.mlp.2.weight") == "head.time_embed.mlp.2.weight"
    assert names.official("head.output.weight") == "flownet.final_layer.linear.weight"
    assert names.official("norm.weight") == "encoder_norm.weight"
    assert names.official("cls_embedding.embedding_table.weight") == "class_emb.weight"


# --------------------------------------------------------------------------------------------- (d) wrong files
def test_a_file_of_another_size_is_named_in_one_line_and_nothing_is_written(tmp_path):
    tok = kl16_file(tmp_path)
    gen_file, state = random_flowar_file(tmp_path)
    deeper = dict(state)  # a second encoder block: a deeper FlowAR for the one-block preset
    deeper.update({k.replace("encoder_blocks.0.", "encoder_blocks.1."): v for k, v in state.items()
                   if k.startswith("encoder_blocks.0.") and "rope" not in k})
    torch.save(deeper, gen_file)
    with pytest.raises(CheckpointMismatch) as err:
        do_import(tmp_path, (tok, gen_file), E2E)
    message = str(err.value)
    assert message == (f"{gen_file} does not fit official={PRESET} (FlowARGenerator): 12 unexpected "
                       "(encoder_blocks.1.attn.qkv.weight, encoder_blocks.1.attn.qkv.bias, "
                       "encoder_blocks.1.attn.proj.weight, … (12 in all)); is it the file of that model, or another "
                       "size?")
    assert not (tmp_path / "run").exists()

    # the cross head's file for the spatial preset: named in FlowAR's own names
    cross_file, _ = random_flowar_file(tmp_path, "cross.pth", head="cross")
    with pytest.raises(CheckpointMismatch, match=r"does not fit official=flowar_s \(FlowARGenerator\): .*missing "
                                                 r"\(flownet\.res_blocks\.0\.ada_lin\.weight"):
        do_import(tmp_path, (tok, cross_file), E2E)

    # a file made for other scales: only its mask tells
    torch.save({**state, "mask": official_mask([1, 2, 16])}, gen_file)
    with pytest.raises(CheckpointMismatch, match=r"the generator file's mask \(1×1×261×261\) is not the one FlowAR "
                                                 r"builds for this preset \(scales \(1, 2, 4, 8, 16\)"):
        do_import(tmp_path, (tok, gen_file), E2E)

    # the command line: one line, non-zero exit
    torch.save(deeper, gen_file)
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={tok}", f"generator_file={gen_file}",
                          *E2E, f"hydra.run.dir={tmp_path / 'cli'}")
    errors = [line for line in done.stderr.splitlines() if line.startswith("arvision:")]
    assert done.returncode != 0 and errors == [f"arvision: error: {message}"]


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset,params,head,steps,cfg,guidance", [
    ("flowar_s", 171.7, "spatial", 25, 4.3, 0.9), ("flowar_l", 586.9, "cross", 25, 2.4, 0.9),
    ("flowar_h", 1913.3, "cross", 50, 2.4, 0.7)])
def test_presets_build_the_released_models_with_the_readme_settings(preset, params, head, steps, cfg, guidance,
                                                                     tmp_path):
    """Parameter counts from the official builders' module shapes (experiments/parity/flowar.py checks every name
    and shape against them)."""
    config = compose_import([f"official={preset}"], tmp_path)
    with torch.device("meta"):
        tokenizer = instantiate(config.tokenizer.model, image_size=256, image_channels=3)
        generator = instantiate(config.generator.model)(spec=tokenizer.spec, num_classes=1000)
    assert round(sum(p.numel() for p in generator.parameters()) / 1e6, 1) == params
    assert tokenizer.spec.grid == (16, 16) and tokenizer.spec.dim == 16 and generator.scales == [1, 2, 4, 8, 16]
    assert generator.head_kind == head and generator.decoder_embed is not None
    sample = OmegaConf.to_container(config.generator.sample)
    assert (sample["steps"], sample["cfg"], sample["guidance_high"], sample["time_grid"]) == (steps, cfg, guidance,
                                                                                            "flowar")
    assert generator.sampling_cost(**sample).head_passes == 5 * (50 if steps == 50 else 24)
    assert config.official.files.generator == {"flowar_s": "FlowAR-S.pth", "flowar_l": "FlowAR-L.pth",
                                               "flowar_h": "FlowAR-H.pth"}[preset]
    assert config.official.files.tokenizer == "kl16.ckpt"


def test_the_official_layout_of_one_block_pair():
    """FlowAR's tensors of one AR block and one head block, as the official classes register them (names, shapes),
    against what FlowAR-S's settings build at width 16."""
    tokenizer_spec = KL16Tokenizer(**VAE).spec
    generator = FlowARGenerator(spec=tokenizer_spec, num_classes=1000, dim=16, depth=1, heads=2, head_width=64,
                                head_depth=1, head_heads=1)
    state = FlowARCheckpoints().generator_to_official(generator.state_dict(), flowar_buffers(generator), generator)
    shapes = {k: tuple(v.shape) for k, v in state.items() if k.startswith(("encoder_blocks.0", "flownet.res"))}
    assert shapes == {
        "encoder_blocks.0.attn.qkv.weight": (48, 16), "encoder_blocks.0.attn.qkv.bias": (48,),
        "encoder_blocks.0.attn.proj.weight": (16, 16), "encoder_blocks.0.attn.proj.bias": (16,),
        "encoder_blocks.0.attn.rope.freqs": (2,),
        "encoder_blocks.0.mlp.fc1_g.weight": (42, 16), "encoder_blocks.0.mlp.fc1_g.bias": (42,),
        "encoder_blocks.0.mlp.fc1_x.weight": (42, 16), "encoder_blocks.0.mlp.fc1_x.bias": (42,),
        "encoder_blocks.0.mlp.fc2.weight": (16, 42), "encoder_blocks.0.mlp.fc2.bias": (16,),
        "encoder_blocks.0.ada_lin.1.weight": (96, 16), "encoder_blocks.0.ada_lin.1.bias": (96,),
        "flownet.res_blocks.0.attn.qkv.weight": (192, 64), "flownet.res_blocks.0.attn.proj.weight": (64, 64),
        "flownet.res_blocks.0.attn.proj.bias": (64,), "flownet.res_blocks.0.attn.rope.freqs": (16,),
        "flownet.res_blocks.0.mlp.fc1_g.weight": (170, 64), "flownet.res_blocks.0.mlp.fc1_g.bias": (170,),
        "flownet.res_blocks.0.mlp.fc1_x.weight": (170, 64), "flownet.res_blocks.0.mlp.fc1_x.bias": (170,),
        "flownet.res_blocks.0.mlp.fc2.weight": (64, 170), "flownet.res_blocks.0.mlp.fc2.bias": (64,),
        "flownet.res_blocks.0.ada_lin.weight": (384, 64), "flownet.res_blocks.0.ada_lin.bias": (384,)}
    assert list(state)[:4] == ["encoder_pos_embed_learned", "decoder_pos_embed_learned",
                               "diffusion_pos_embed_learned", "mask"]
    assert list(state)[-4:] == ["flownet.final_layer.linear.weight", "flownet.final_layer.linear.bias",
                                "flownet.final_layer.adaLN_modulation.1.weight",
                                "flownet.final_layer.adaLN_modulation.1.bias"]
    assert torch.equal(state["mask"], official_mask([1, 2, 4, 8, 16]))
