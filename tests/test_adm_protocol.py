"""The ADM evaluator's protocol (reference=<VIRTUAL_imagenet256_labeled.npz>): parity of arvision.metrics.adm with
the evaluator's own functions (the golden fixture written by experiments/parity/adm_evaluator.py from a
guided-diffusion checkout), reading reference batches, and arvision-eval end to end on a random-weight Inception
(the real weights are never downloaded in tests)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from arvision.cli.common import config_dir
from arvision.metrics import INCEPTION_WEIGHTS_FILE, MissingWeights, adm
from arvision.reevaluate import EvalError, reevaluate

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "adm.pt"


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def pool_like(seed: int, n: int, d: int, *, loc: float, scale: float) -> torch.Tensor:
    """The harness's seeded pool_3-like features (experiments/parity/adm_evaluator.py)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=generator) * scale + loc).clamp_min(0)


# --------------------------------------------------------------------------------------------- parity (fixture)
def test_frechet_distance_is_the_evaluators_including_its_eps_retry_and_imaginary_check(golden):
    names = [case["name"] for case in golden["fid"]]
    assert any("eps retry" in n for n in names) and any("imaginary" in n for n in names)
    for case in golden["fid"]:
        samples = adm.FrechetStats(case["mu1"].numpy(), case["sigma1"].numpy())
        reference = adm.FrechetStats(case["mu2"].numpy(), case["sigma2"].numpy())
        if case["fid"] is None:  # the evaluator raised: the square root's diagonal is far from real
            with pytest.raises(adm.AdmError, match="imaginary component"):
                adm.frechet_distance(samples, reference)
        else:
            assert adm.frechet_distance(samples, reference) == pytest.approx(case["fid"], rel=1e-7, abs=1e-9), \
                case["name"]


def test_statistics_and_fid_of_seeded_features_are_the_evaluators(golden):
    spec = golden["fid_seeded"]
    samples = pool_like(spec["seed_samples"], spec["n_samples"], spec["d"], loc=spec["samples_loc"],
                        scale=spec["samples_scale"]).numpy()
    reference = pool_like(spec["seed_reference"], spec["n_reference"], spec["d"], loc=spec["reference_loc"],
                          scale=spec["reference_scale"]).numpy()
    assert samples.sum(dtype=np.float64) + reference.sum(dtype=np.float64) == pytest.approx(spec["checksum"])
    stats = adm.statistics(samples)
    assert stats.mu.dtype == np.float32 and stats.sigma.dtype == np.float64  # as np.mean / np.cov give them
    fid = adm.frechet_distance(stats, adm.statistics(reference))
    assert fid == pytest.approx(spec["fid"], rel=1e-7)
    assert fid > 1.0  # two different distributions: the check is not 0 == 0


def test_inception_score_is_the_evaluators_consecutive_splits(golden):
    logits = golden["is_inputs"]["features"].mm(golden["is_inputs"]["weights"])  # torch-fidelity's logits_unbiased
    assert {case["split_size"] for case in golden["is"]} == {500, 5000}
    for case in golden["is"]:
        assert adm.inception_score(logits, split_size=case["split_size"]) == pytest.approx(case["is"], rel=1e-5)
    # The splits are consecutive, in file order: sorting the samples by their top class changes the score.
    order = logits.argmax(1).argsort()
    assert adm.inception_score(logits[order], split_size=500) != pytest.approx(golden["is"][0]["is"], rel=1e-3)


@pytest.mark.parametrize("case", range(3))
def test_precision_recall_and_radii_follow_the_evaluators_blocks(golden, case):
    """Radii within two float16 steps of the evaluator's (TF sums the fp16 norms in its own order), most of them
    identical; precision and recall within 0.5 % (a few points on a ball's edge)."""
    spec = golden["pr"][case]
    ref = pool_like(spec["seed_ref"], spec["n_ref"], spec["d"], loc=spec["ref_loc"], scale=spec["ref_scale"])
    smp = pool_like(spec["seed_samples"], spec["n_samples"], spec["d"], loc=spec["samples_loc"],
                    scale=spec["samples_scale"])
    ref[: spec["boost"]] *= 20
    assert float(ref.double().sum() + smp.double().sum()) == pytest.approx(spec["checksum"])
    blocks = {"row_batch": spec["row"], "col_batch": spec["col"]}
    for ours, official in ((adm.manifold_radii(ref, **blocks), spec["ref_radii"]),
                           (adm.manifold_radii(smp, **blocks), spec["sample_radii"])):
        assert float(((ours - official).abs() / official).max()) <= 2e-3
        assert float((ours == official).double().mean()) >= 0.4
    precision, recall = adm.precision_recall(ref, smp, **blocks)
    assert precision == pytest.approx(spec["precision"], abs=5e-3)
    assert recall == pytest.approx(spec["recall"], abs=5e-3)
    assert 0.3 < precision < 0.7 and 0.3 < recall < 0.7  # neither saturated: the comparison means something


def test_fp16_distances_fall_back_to_fp32_per_block_on_overflow():
    small = torch.full((2, 4), 1.0)
    huge = torch.full((2, 4), 200.0)  # squared norms 160,000 > 65,504: fp16 overflows
    d16 = adm.pairwise_sq_distances(small, small + 0.001)
    assert d16.dtype == torch.float32 and float(d16.max()) == 0.0  # 4·0.001² is below fp16's resolution here
    d32 = adm.pairwise_sq_distances(huge, huge + 1.0)
    assert torch.isfinite(d32).all() and torch.allclose(d32, torch.full((2, 2), 4.0), rtol=1e-3)


# --------------------------------------------------------------------------------------------- reading npz files
def write_reference(path: Path, *, images: int = 5, side: int = 256, seed: int = 0, **override) -> Path:
    """A random-content reference batch with VIRTUAL_imagenet256_labeled.npz's keys, shapes and dtypes (fewer
    images; the statistics are valid covariances)."""
    rng = np.random.default_rng(seed)
    arrays = {"arr_0": rng.integers(0, 256, (images, side, side, 3), dtype=np.uint8),
              "mu": rng.normal(size=2048), "sigma": np.diag(rng.uniform(0.5, 1.5, 2048)),
              "mu_s": rng.normal(size=2023), "sigma_s": np.diag(rng.uniform(0.5, 1.5, 2023))}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_reference_batch_layout_is_read_and_checked(tmp_path):
    path = write_reference(tmp_path / "VIRTUAL_like.npz")
    reference = adm.read_reference(path)
    assert reference.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert reference.pool.mu.shape == (2048,) and reference.spatial.sigma.shape == (2023, 2023)
    assert reference.images.shape == (5, 256, 256, 3)
    with np.load(path) as npz:
        assert np.array_equal(np.concatenate(list(reference.images.batches(2))), npz["arr_0"])
        assert np.array_equal(reference.pool.sigma, npz["sigma"])
    described = reference.describe()
    assert described["num_images"] == 5 and described["sha256"] == reference.sha256
    # MAR's statistics file holds mu/sigma only: FID works, sFID and precision/recall have nothing to use.
    stats_only = adm.read_reference(write_reference(tmp_path / "stats.npz", arr_0=None, mu_s=None, sigma_s=None))
    assert stats_only.images is None and stats_only.spatial is None and stats_only.pool is not None


@pytest.mark.parametrize("make, says", [
    (lambda p: p.write_text("not a zip"), "is not an .npz file"),
    (lambda p: np.savez(p, arr_1=np.zeros(3)), "has neither mu nor arr_0"),
    (lambda p: write_reference(p, mu=np.zeros(1000)), "mu is float64 (1000,)"),
    (lambda p: write_reference(p, sigma_s=None), "has mu_s without sigma_s"),
    (lambda p: write_reference(p, arr_0=np.zeros((2, 8, 8, 3), np.float32)), "arr_0 must be uint8 N×H×W×3"),
    (lambda p: write_reference(p, arr_0=np.zeros((2, 8, 8, 1), np.uint8)), "arr_0 must be uint8 N×H×W×3"),
])
def test_a_wrong_reference_file_is_one_line_naming_it(tmp_path, make, says):
    path = tmp_path / "ref.npz"
    make(path)
    with pytest.raises(adm.AdmError) as info:
        adm.read_reference(path)
    message = str(info.value)
    assert says in message and str(path) in message and "\n" not in message
    with pytest.raises(adm.AdmError, match="no such file"):
        adm.read_reference(tmp_path / "missing.npz")


def test_samples_are_streamed_in_batches_from_any_npz_writing(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (7, 9, 5, 3), dtype=np.uint8)
    writers = {"plain": lambda p: np.savez(p, arr_0=images),
               "compressed": lambda p: np.savez_compressed(p, arr_0=images),
               "fortran": lambda p: np.savez(p, arr_0=np.asfortranarray(images)),
               "strided": lambda p: np.savez(p, arr_0=torch.from_numpy(images).permute(0, 3, 1, 2)
                                             .permute(0, 2, 3, 1).numpy())}
    for name, write in writers.items():
        write(tmp_path / f"{name}.npz")
        read = adm.NpzImages(tmp_path / f"{name}.npz")
        batches = list(read.batches(3))
        assert [len(b) for b in batches] == [3, 3, 1] and np.array_equal(np.concatenate(batches), images), name
    data = (tmp_path / "plain.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(adm.AdmError, match="is not an .npz file|ends early"):
        list(adm.NpzImages(tmp_path / "cut.npz").batches(3))
    with zipfile.ZipFile(tmp_path / "labels.npz", "w") as archive:
        archive.writestr("labels.npy", b"")
    with pytest.raises(adm.AdmError, match="has no arr_0"):
        adm.NpzImages(tmp_path / "labels.npz")


# --------------------------------------------------------------------------------------------- arvision-eval
def eval_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


@pytest.fixture
def random_inception(tmp_path, monkeypatch) -> Path:
    """A weight file path that loads torch-fidelity's Inception with seeded random weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({}, weights)

    def random_init(self, state):  # unit BatchNorm scales and He-initialised convs keep the activations alive
        generator = torch.Generator().manual_seed(0)
        for module in self.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
            elif isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, generator=generator)

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", random_init)
    return weights


def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels_in_tf_order(random_inception):
    model = adm.AdmInception(random_inception, torch.device("cpu"))
    captured = {}
    handle = model.net.Mixed_6d.register_forward_hook(lambda m, i, out: captured.update(block=out.clone()))
    images = np.random.default_rng(2).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    features = model(images)
    handle.remove()
    model.close()
    # Mixed_6d's output starts with its 192-channel 1×1 branch (TF mixed_6/conv); TF flattens H×W×C.
    expected = captured["block"][:, :adm.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(2, -1)
    assert features.spatial.shape == (2, adm.SPATIAL_DIM) and features.pool.shape == (2, 2048)
    assert np.array_equal(features.spatial, expected.numpy()) and features.spatial.std() > 0
    assert features.logits.shape == (2, 1008)


def test_arvision_eval_reference_gives_the_adm_numbers_with_provenance_and_no_dataset(tmp_path, random_inception,
                                                                                      monkeypatch):
    reference_path = write_reference(tmp_path / "VIRTUAL_like.npz")
    samples = np.random.default_rng(3).integers(0, 256, (6, 256, 256, 3), dtype=np.uint8)
    npz = tmp_path / "samples" / "samples.npz"
    npz.parent.mkdir()
    np.savez(npz, arr_0=samples, labels=np.arange(6))
    calls = []

    def recorded(samples_stats, reference_stats, **kwargs):  # a 2048² sqrtm takes minutes on two cores
        calls.append((samples_stats, reference_stats))
        return float(len(calls))

    monkeypatch.setattr(adm, "frechet_distance", recorded)
    entry = reevaluate(eval_cfg(f"npz={npz}", f"reference={reference_path}", f"metrics.inception_weights="
                                f"{random_inception}", "metrics.batch_size=4", "device=cpu"))
    m = entry["metrics"]
    assert list(m) == ["fid", "sfid", "is", "precision", "recall"]
    sha = hashlib.sha256(reference_path.read_bytes()).hexdigest()
    for name, value in m.items():
        assert value["extractor"] == "inception (ADM protocol)" and value["num_samples"] == 6, name
        assert value["reference"] == str(reference_path) and value["reference_sha256"] == sha, name
    assert entry["reference"]["sha256"] == sha and entry["reference"]["num_images"] == 5
    assert entry["settings"]["num_samples"] == 6 and "papers use 50,000" in entry["settings"]["note"]
    assert m["precision"]["num_reference"] == 5 and m["precision"]["k"] == 3

    # The numbers are this module's functions of the features of exactly these images.
    model = adm.AdmInception(random_inception, torch.device("cpu"))
    fake, real = model(samples), model(np.load(reference_path)["arr_0"])
    model.close()
    with np.load(reference_path) as ref:
        (fid_s, fid_r), (sfid_s, sfid_r) = calls
        assert np.array_equal(fid_r.mu, ref["mu"]) and np.array_equal(fid_r.sigma, ref["sigma"])
        assert np.array_equal(sfid_r.mu, ref["mu_s"]) and np.array_equal(sfid_r.sigma, ref["sigma_s"])
    assert np.allclose(fid_s.mu, fake.pool.mean(0), atol=1e-5) and fid_s.sigma.shape == (2048, 2048)
    assert np.allclose(sfid_s.mu, fake.spatial.mean(0), atol=1e-5) and sfid_s.sigma.shape == (2023, 2023)
    assert (m["fid"]["value"], m["sfid"]["value"]) == (1.0, 2.0)
    assert m["is"]["value"] == pytest.approx(adm.inception_score(fake.logits), rel=1e-5)
    precision, recall = adm.precision_recall(torch.from_numpy(real.pool), torch.from_numpy(fake.pool))
    assert (m["precision"]["value"], m["recall"]["value"]) == pytest.approx((precision, recall))

    saved = json.loads((npz.parent / "results.json").read_text())
    assert saved["data"] is None and saved["evaluations"][-1]["reference"]["sha256"] == sha


def test_adm_select_outside_the_protocol_is_refused(tmp_path):
    with pytest.raises(EvalError, match=r"select: kid, accuracy not part of the ADM protocol"):
        reevaluate(eval_cfg(f"npz={tmp_path / 's.npz'}", f"reference={tmp_path / 'r.npz'}",
                            "select=[fid,kid,accuracy]"))


def test_wrong_reference_and_missing_weights_fail_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    from arvision.cli import evaluate as eval_cli
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(10))
    with pytest.raises(SystemExit):
        eval_cli.main.__wrapped__(eval_cfg(f"npz={npz}", f"reference={bad}"))
    err = capsys.readouterr().err
    assert err.startswith("arvision: error: reference=") and "mu is float64 (10,)" in err and err.count("\n") == 1

    for var in ("ARVISION_INCEPTION_WEIGHTS", "TORCH_HOME", "HOME"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    good = write_reference(tmp_path / "ref.npz", images=4, side=32)
    cfg = eval_cfg(f"npz={npz}", f"reference={good}", f"metrics.inception_weights={tmp_path / 'none.pth'}")
    with pytest.raises(MissingWeights):
        reevaluate(cfg)
    with pytest.raises(SystemExit):
        eval_cli.main.__wrapped__(cfg)
    err = capsys.readouterr().err
    assert err.startswith("arvision: error: Inception weights not found") and err.count("\n") == 1
    assert INCEPTION_WEIGHTS_FILE in err and "metrics.inception_weights" in err
    assert not (tmp_path / "results.json").exists()


def test_a_run_is_sampled_class_balanced_and_evaluated_without_building_its_dataset(tmp_path, random_inception,
                                                                                  monkeypatch):
    from arvision import pipeline
    from tests.conftest import compose_train
    cfg = compose_train(["debug=tiny", "data=shapes", "data.channels=3", "logger=none"], tmp_path)
    pipeline.run(cfg, tmp_path / "run")
    gray = compose_train(["debug=tiny", "data=shapes", "logger=none"], tmp_path / "g")
    pipeline.run(gray, tmp_path / "g" / "run")
    reference_path = write_reference(tmp_path / "ref.npz", images=5, side=32)

    def no_dataset(*args, **kwargs):
        raise AssertionError("the ADM protocol needs no dataset")

    monkeypatch.setattr(pipeline, "build_datamodule", no_dataset)
    monkeypatch.setattr(adm, "frechet_distance", lambda samples, reference, **kwargs: 0.5)
    compared = []

    def precision_recall(reference, samples, **kwargs):  # what the run path hands to the evaluator's P/R
        compared.append((tuple(reference.shape), tuple(samples.shape)))
        return 0.25, 0.75
    monkeypatch.setattr(adm, "precision_recall", precision_recall)
    entry = reevaluate(eval_cfg(f"run={tmp_path / 'run'}", f"reference={reference_path}", "metrics.num_samples=8",
                                f"metrics.inception_weights={random_inception}", "metrics.batch_size=8",
                                f"paths.artifact_dir={tmp_path / 'artifacts'}", "device=cpu"))
    assert entry["settings"]["select"] == ["fid", "sfid", "is", "precision", "recall", "sampling"]
    assert entry["metrics"]["fid"]["value"] == 0.5 and entry["metrics"]["fid"]["num_samples"] == 8
    assert entry["metrics"]["sample_img_per_s"]["value"] > 0
    assert compared == [((5, 2048), (8, 2048))]  # the 5 reference images' and the 8 samples' pool_3 features
    assert entry["metrics"]["precision"]["value"] == 0.25 and entry["metrics"]["recall"]["value"] == 0.75
    assert entry["metrics"]["recall"]["num_reference"] == 5
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["evaluations"][-1]["reference"]["path"] == str(reference_path)
    # A gray run cannot be compared with an RGB reference batch: one line, not a traceback.
    with pytest.raises(EvalError, match="uint8 N×H×W×3"):
        reevaluate(eval_cfg(f"run={tmp_path / 'g' / 'run'}", f"reference={reference_path}", "metrics.num_samples=4",
                            f"metrics.inception_weights={random_inception}", "select=[is]",
                            f"paths.artifact_dir={tmp_path / 'g' / 'artifacts'}", "device=cpu"))
