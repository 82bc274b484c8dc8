"""The RQ-VAE / RQ-Transformer official files (arvision.imports.rq): parity with the official code from the golden
fixture, arvision-import → arvision-sample → arvision-eval end to end, the export round trip, wrong files named in
one line, every layout the released files use, and presets that build the released models with their evaluation
settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from arvision import pipeline
from arvision.cli import evaluate as evaluate_cli
from arvision.cli import sample as sample_cli
from arvision.cli.common import config_dir
from arvision.generators.raster import soft_cross_entropy
from arvision.generators.sampling import top_k_filter, top_p_filter_llamagen, top_p_filter_rq
from arvision.imports.base import CheckpointMismatch, read_official
from arvision.imports.rq import PADDING, RQCheckpoints
from arvision.imports.runs import export_official, import_official
from arvision.utils.instantiate import instantiate
from tests.conftest import REPO, compose_import, run_import_cli
from tests.test_pipeline import compose_eval

FIXTURE = REPO / "tests" / "fixtures" / "parity" / "rq.pt"
PRESET = "rq_transformer_821m"
PRESETS = ["rq_transformer_480m", "rq_transformer_821m", "rq_transformer_1400m", "rq_transformer_1400m_rqvae_50e",
           "rq_transformer_3800m"]
# The fixture's CPU-sized models (8-px images → 4×4×4 codes of 64, a 2+2-layer RQ-Transformer of width 32, 10
# classes) on 3-channel shapes of 10 classes.
TINY = ["data=shapes", "data.image_size=8", "data.channels=3", "data.num_classes=10", "tokenizer.model.ch=32",
        "tokenizer.model.ch_mult=[1,1]", "tokenizer.model.num_res_blocks=1", "tokenizer.model.z_channels=32",
        "tokenizer.model.vocab_size=64", "tokenizer.model.code_dim=8", "generator.model.dim=32",
        "generator.model.depth=2", "generator.model.head_depth=2", "generator.model.heads=2"]



@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


# --------------------------------------------------------------------------------------------- official-layout files
def training_file(state: dict, **more) -> dict:
    """RQ's training checkpoint (rqvae/trainers/trainer.py save_ckpt): weights under "state_dict" (and
    "state_dict_ema" with EMA) beside the epoch, optimiser and scheduler."""
    return {"epoch": 10, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
            **more}


def write(tmp_path: Path, tokenizer: object, generator: object) -> tuple[Path, Path]:
    """The tarball's layout: stage1/model.pt and stage2/model.pt."""
    tok, gen = tmp_path / "stage1" / "model.pt", tmp_path / "stage2" / "model.pt"
    for path, obj in ((tok, tokenizer), (gen, generator)):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
    return tok, gen


def official_states(tmp_path: Path, *extra: str, seed: int = 0) -> tuple[dict, dict]:
    """Official-layout state dicts of models the preset builds with `extra` overrides (random weights), written in
    the official names by the export's own mapping (the fixture's states come from the official classes)."""
    cfg = compose_import([f"official={PRESET}", *TINY, *extra], tmp_path)
    torch.manual_seed(seed)
    tokenizer = instantiate(cfg.tokenizer.model, image_size=8, image_channels=3)
    generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=10)
    with torch.no_grad():
        generator.depth_head.output.weight.normal_(std=0.3)
    family = RQCheckpoints()
    padding = {PADDING.format(d=c): torch.zeros(1, tokenizer.spec.dim) for c in range(tokenizer.quantize.num_codebooks)}
    return (family.tokenizer_to_official(tokenizer.state_dict(), padding, tokenizer),
            family.generator_to_official(generator.state_dict(), {}, generator))


def do_import(tmp_path: Path, files: tuple[Path, Path], *extra: str, run: str = "run") -> pipeline.FinishedRun:
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={files[0]}", f"generator_file={files[1]}", *TINY,
                          *extra], tmp_path)
    import_official(cfg, tmp_path / run)
    return pipeline.load_run(tmp_path / run)


# --------------------------------------------------------------------------------------------- (a) golden fixture
def test_golden_fixture_outputs_equal_the_official_code(fixture, tmp_path):
    """The fixture holds official-layout state dicts (seeded random weights), inputs and the outputs of the official
    code at commit `official_commit` (experiments/parity/rq.py --fixture); the import reproduces every one."""
    fx = fixture
    official, inputs, settings, tol = fx["official"], fx["inputs"], fx["settings"], fx["tolerance"]
    files = write(tmp_path, training_file(fx["state"]["tokenizer"]), training_file(fx["state"]["generator"]))
    cfg = compose_import([f"official={fx['preset']}", f"tokenizer_file={files[0]}", f"generator_file={files[1]}",
                          *fx["overrides"]], tmp_path)
    import_official(cfg, tmp_path / "run")
    run = pipeline.load_run(tmp_path / "run")
    tokenizer, generator = run.tokenizer, run.generator
    images, labels, sample_labels = inputs["images"], inputs["labels"], inputs["sample_labels"]
    seed, temperature, top_p = settings["seed"], settings["soft_temperature"], settings["top_p"]
    vocab = tokenizer.spec.vocab_size
    soft_images, soft_same = f"soft codes (T={temperature}) from images", f"soft codes (T={temperature}), same latents"
    ours: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        codes = official["codes"]
        latents = tokenizer.latents(images)
        soft = tokenizer.soft_codes(latents, temperature=temperature, stochastic=False)[0]
        torch.manual_seed(seed)
        stochastic = tokenizer.soft_codes(latents, temperature=temperature)[1]
        rows = official["logits"].flatten(0, 2)
        torch.manual_seed(seed)
        loss = generator.loss(latents, labels)["loss"]
        ours.update({
            "codes": tokenizer.encode(images), "reconstructions": tokenizer(images)["recon"],
            "decoded images": tokenizer.decode(codes), "latents": latents.permute(0, 2, 3, 1),
            soft_images: soft, soft_same: soft, "stochastic codes, same latents": stochastic,
            "logits": generator(codes, labels), "soft-target loss": loss,
            "top-k/top-p kept sets": torch.stack([top_p_filter_rq(top_k_filter(rows, k), p).isfinite()
                                                  for k, p in settings["kept"]]),
        })
    ours["greedy codes"] = generator.sample(sample_labels, temperature=0.0)
    sampled = f"sampled codes, top-k {vocab} top-p {top_p}"
    ours[sampled] = generator.sample(sample_labels, top_k=vocab, top_p=top_p, top_p_rule="rq",
                                     generator=torch.Generator().manual_seed(seed))
    quantizer = tokenizer.quantize.train()
    steps = []
    with torch.no_grad():
        for step in range(2):
            torch.manual_seed(seed + step)
            steps.append(quantizer(latents)[1])
    quantizer.eval()
    ours.update({"EMA step: codes of 2 steps": torch.stack(steps), "EMA step: codebook": quantizer.embedding.weight,
                 "EMA step: counts": quantizer.ema_cluster_size[0], "EMA step: sums": quantizer.ema_embed_sum[0]})
    assert set(ours) == set(official)  # every recorded official output is checked
    for name, theirs in official.items():
        mine = ours[name].reshape(theirs.shape)
        if theirs.is_floating_point():
            assert (mine - theirs).abs().max().item() <= tol[name], name
        else:
            assert torch.equal(mine.to(theirs.dtype), theirs), name
    # rows that can fail: hard targets on the same drawn codes give another loss, and the drawn codes are no
    # argmin codes (stochastic), nor is the codebook after the steps the one an update pooled over depths gives
    with torch.no_grad():
        drawn = official["stochastic codes, same latents"]
        hard = F.cross_entropy(generator(drawn, labels).flatten(0, 2), drawn.flatten())
    assert abs(hard.item() - official["soft-target loss"].item()) > 100 * tol["soft-target loss"]
    assert not torch.equal(drawn, official["codes"])


def test_the_soft_target_loss_is_rq_formula_on_any_distribution():
    """soft_cross_entropy against RQ's `soft_target_cross_entropy` (x − m − log(Σ exp(x − m) + 1e-7)), written out."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 33, generator=gen) * 3
    targets = torch.softmax(torch.randn(5, 7, 33, generator=gen), dim=-1)
    m = logits.max(dim=-1, keepdim=True).values
    log_probs = logits - m - torch.log(torch.exp(logits - m).sum(dim=-1, keepdim=True) + 1e-7)
    official = (-targets * log_probs).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, targets), official, atol=1e-6, rtol=0)
    one_hot = F.one_hot(targets.argmax(-1), 33).float()  # one-hot targets: the hard cross-entropy
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot),
                               F.cross_entropy(logits.flatten(0, 1), targets.argmax(-1).flatten()))


def test_rq_nucleus_drops_a_token_whose_preceding_mass_equals_p():
    """RQ's `top_p_probs` removes a token when the sum before it is ≥ p; LlamaGen's keeps it while ≤ p."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))  # exact binary fractions: the sums are exact
    assert top_p_filter_rq(logits, 0.75).isfinite().tolist() == [[True, True, False, False]]
    assert top_p_filter_llamagen(logits, 0.75).isfinite().tolist() == [[True, True, True, False]]
    assert top_p_filter_rq(logits, 1.0).isfinite().all()


# --------------------------------------------------------------------------------------------- (b) end to end
def sample_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))



def test_import_cli_then_sample_and_eval_the_imported_run(fixture, tmp_path, capsys):
    files = write(tmp_path, training_file(fixture["state"]["tokenizer"]),
                  training_file(fixture["state"]["generator"]))
    run = tmp_path / "imported"
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={files[0]}",
                          f"generator_file={files[1]}", *TINY, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert f"imported official={PRESET}" in done.stdout and f"arvision-sample run={run}" in done.stdout
    record = json.loads((run / "results.json").read_text())
    imported = record["imported"]
    assert imported["family"] == "rq" and imported["preset"] == PRESET
    assert imported["files"]["tokenizer"]["layout"] == "state_dict" == imported["files"]["generator"]["layout"]
    assert imported["published"]["fid"] == 13.11 and "no CFG" in imported["convention"]
    assert record["config"]["generator"]["sample"] == {"cfg": 1.0, "temperature": 1.0, "top_k": 16384,
                                                      "top_p": 0.92, "top_p_rule": "rq", "decode": "eager"}

    out = tmp_path / "samples.npz"
    sample_cli.main.__wrapped__(sample_config(f"run={run}", "num_samples=10", "batch_size=5", f"out={out}"))
    assert capsys.readouterr().out.startswith(f"wrote {out}: 10 samples")
    npz = np.load(out)
    assert npz["arr_0"].shape == (10, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["labels"], minlength=10).tolist() == [1] * 10

    evaluate_cli.main.__wrapped__(compose_eval(
        f"run={run}", f"paths.artifact_dir={tmp_path / 'artifacts'}", f"paths.data_dir={tmp_path / 'data'}",
        "metrics.num_samples=10", "metrics.num_reference=40", "metrics.batch_size=10", "metrics.latency_batch_size=null",
        "metrics.classifier.epochs=0.1", "select=[fid,accuracy,sampling]"))
    evaluation = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert np.isfinite(evaluation["metrics"]["fid"]["value"]) and evaluation["metrics"]["fid"]["num_samples"] == 10
    assert 0.0 <= evaluation["metrics"]["accuracy"]["value"] <= 1.0


# --------------------------------------------------------------------------------------------- (c) round trip
def assert_same_file(path: Path, expected: dict) -> dict:
    back = read_official(path)
    assert list(back) == list(expected)  # the top-level layout (training-only entries are not carried)
    key = next(iter(expected))
    state, original = back[key], expected[key]
    assert list(state) == list(original)  # names, in the official order
    for name, tensor in original.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    return state


def test_export_writes_the_official_files_back(fixture, tmp_path):
    tok_state, gen_state = fixture["state"]["tokenizer"], fixture["state"]["generator"]
    do_import(tmp_path, write(tmp_path, training_file(tok_state), training_file(gen_state)))
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert written == [tmp_path / "out" / "stage1" / "model.pt", tmp_path / "out" / "stage2" / "model.pt"]
    tokenizer = assert_same_file(written[0], {"state_dict": tok_state})
    assert_same_file(written[1], {"state_dict": gen_state})
    # RQ-VAE's shared codebook is one module listed 4 times: the 4 names hold one tensor again
    storages = {tokenizer[f"quantizer.codebooks.{d}.weight"].untyped_storage().data_ptr() for d in range(4)}
    assert len(storages) == 1
    assert tok_state["quantizer.codebooks.0.weight"].shape[0] == 64 + 1  # the padding row came back


def test_per_depth_codebooks_round_trip(tmp_path):
    tok_state, gen_state = official_states(tmp_path, "tokenizer.model.shared_codebook=false", seed=3)
    files = write(tmp_path, training_file(tok_state), training_file(gen_state))
    run = do_import(tmp_path, files, "tokenizer.model.shared_codebook=false")
    for d in range(4):  # each depth its own book, the padding row set aside
        assert torch.equal(run.tokenizer.quantize.book(d).weight, tok_state[f"quantizer.codebooks.{d}.weight"][:-1])
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert_same_file(written[0], {"state_dict": tok_state})
    assert_same_file(written[1], {"state_dict": gen_state})


# --------------------------------------------------------------------------------------------- (d) wrong files
def test_a_file_of_another_size_is_named_in_one_line_and_nothing_is_written(fixture, tmp_path):
    tok_state = fixture["state"]["tokenizer"]
    _, deeper = official_states(tmp_path, "generator.model.depth=3")  # a 3-layer body for the 2-layer preset
    files = write(tmp_path, training_file(tok_state), training_file(deeper))
    with pytest.raises(CheckpointMismatch) as err:
        do_import(tmp_path, files)
    message = str(err.value)
    assert message == (f"{files[1]} does not fit official={PRESET} (RasterGenerator): 12 unexpected "
                       "(body_transformer.blocks.2.ln1.weight, body_transformer.blocks.2.ln1.bias, "
                       "body_transformer.blocks.2.ln2.weight, … (12 in all)); is it the file of "
                       "that model, or another size?")
    assert not (tmp_path / "run").exists() and not (tmp_path / "artifacts").exists()

    bigger, _ = official_states(tmp_path, "tokenizer.model.vocab_size=128")  # a codebook of another size
    files = write(tmp_path, training_file(bigger), training_file(fixture["state"]["generator"]))
    with pytest.raises(CheckpointMismatch, match=r"stage1/model\.pt does not fit official=rq_transformer_821m "
                                                 r"\(RVQTokenizer\): 3 of another shape "
                                                 r"\(quantizer\.codebooks\.\*\.cluster_size_ema 1×128 in the file, "
                                                 r"1×64 in the model, .*\(3 in all\)\)"):
        do_import(tmp_path, files)

    # one codebook per depth in the file, a shared one in the preset
    per_depth, _ = official_states(tmp_path, "tokenizer.model.shared_codebook=false", seed=4)
    files = write(tmp_path, training_file(per_depth), training_file(fixture["state"]["generator"]))
    with pytest.raises(CheckpointMismatch, match=r"codebooks\.0 … 3\.weight differ, so the file has one codebook "
                                                 r"per depth .* set tokenizer\.model\.shared_codebook=false"):
        do_import(tmp_path, files)

    # the command line: one line, non-zero exit
    files = write(tmp_path, training_file(tok_state), training_file(deeper))
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={files[0]}",
                          f"generator_file={files[1]}", *TINY, f"hydra.run.dir={tmp_path / 'cli'}")
    errors = [line for line in done.stderr.splitlines() if line.startswith("arvision:")]
    assert done.returncode != 0 and errors == [f"arvision: error: {message}"]
    assert not (tmp_path / "cli" / "results.json").exists()


def test_cfg_is_refused_in_one_sentence_the_model_has_no_null_class(fixture, tmp_path):
    run = do_import(tmp_path, write(tmp_path, training_file(fixture["state"]["tokenizer"]),
                                    training_file(fixture["state"]["generator"])))
    assert run.generator.cls_embedding.embedding_table.weight.shape[0] == 10  # no null row
    with pytest.raises(ValueError, match=r"cfg=2\.0 needs a null class, and this model has none"):
        run.generator.sample(torch.tensor([1]), cfg=2.0)


# --------------------------------------------------------------------------------------------- (e) every layout
@pytest.mark.parametrize("layout, ema, found", [
    ("training", False, "state_dict"),      # the released stage1/stage2 model.pt
    ("training_ema", False, "state_dict"),  # with EMA weights: the official sampler without --ema reads state_dict
    ("training_ema", True, "state_dict_ema"),  # ema=true reads them, as --ema
    ("plain", False, ""),                   # a bare state dict
    ("wrapped", False, "state_dict"),       # names carrying DDP's module. and torch.compile's _orig_mod.
])
def test_every_layout_of_the_released_files_is_read(fixture, layout, ema, found, tmp_path):
    tok_state = fixture["state"]["tokenizer"]
    weights = fixture["state"]["generator"]
    _, other = official_states(tmp_path, seed=2)
    expected = other if found == "state_dict_ema" else weights
    generator_file = {
        "training": training_file(weights), "training_ema": training_file(weights, state_dict_ema=other),
        "plain": weights, "wrapped": training_file({f"module._orig_mod.{k}": v for k, v in weights.items()}),
    }[layout]
    tokenizer_file = tok_state if layout == "plain" else training_file(tok_state)
    files = write(tmp_path, tokenizer_file, generator_file)
    run = do_import(tmp_path, files, f"ema={str(ema).lower()}")
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["imported"]["files"]["generator"]["layout"] == found
    family = RQCheckpoints()
    back = family.generator_to_official(run.generator.state_dict(), {}, run.generator)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    assert torch.equal(run.tokenizer.quantize.embedding.weight, tok_state["quantizer.codebooks.0.weight"][:-1])


# --------------------------------------------------------------------------------------------- presets
# Parameter counts of the official classes at 341395e (RQTransformer from configs/imagenet256/stage2, RQVAE from
# stage1/in256-rqvae-8x8x4.yaml; experiments/parity/rq.py also matches every name and shape). The RQ-VAE count has
# the codebook's padding row, which arvision keeps beside the weights.
OFFICIAL_PARAMS = {"rq_transformer_480m": 480_921_088, "rq_transformer_821m": 820_899_328,
                   "rq_transformer_1400m": 1_387_529_728, "rq_transformer_1400m_rqvae_50e": 1_387_529_728,
                   "rq_transformer_3800m": 3_822_488_064}
RQVAE_PARAMS = 104_402_051  # the shared codebook (16385 × 256, padding row included) counted once


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build_the_released_models_with_their_evaluation_settings(preset, tmp_path):
    cfg = compose_import([f"official={preset}"], tmp_path)
    with torch.device("meta"):
        tokenizer = instantiate(cfg.tokenizer.model, image_size=cfg.data.image_size, image_channels=cfg.data.channels)
        generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=cfg.data.num_classes)
    assert sum(p.numel() for p in generator.parameters()) == OFFICIAL_PARAMS[preset]
    assert sum(p.numel() for p in tokenizer.parameters()) + 256 == RQVAE_PARAMS  # + the padding row
    assert tokenizer.spec.grid == (8, 8) and tokenizer.spec.depth == 4 and tokenizer.spec.vocab_size == 16384
    assert generator.cls_embedding.embedding_table.weight.shape[0] == 1000  # no null class
    assert dict(cfg.generator.sample) == {"cfg": 1.0, "temperature": 1.0, "top_k": 16384, "top_p": 0.92,
                                          "top_p_rule": "rq", "decode": "eager"}
    assert cfg.official.name == preset and cfg.ema is False
    assert dict(cfg.official.files) == {"tokenizer": "stage1/model.pt", "generator": "stage2/model.pt"}
    assert cfg.official.published.fid > 0 and "README" in cfg.official.published.source
    assert trains_on_latents_by_default(cfg)


def trains_on_latents_by_default(cfg) -> bool:
    """The presets train as the RQ-Transformer does: soft targets at T = 0.5 from stochastic codes."""
    model = cfg.generator.model
    return model.soft_targets == 0.5 and model.stochastic_codes and model.code_embeddings == "tokenizer"
