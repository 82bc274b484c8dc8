"""Parity of `arvision.metrics.adm` with the ADM evaluator's own functions (guided-diffusion evaluations/evaluator.py).

Runs the evaluator's statistics, Fréchet distance, Inception Score (softmax graph) and precision/recall
(ManifoldEstimator with its TF distance blocks) on seeded random features — no Inception graph, no images — and the
same inputs through arvision's functions; one row per output in parity.csv. With `--fixture` it writes
`tests/fixtures/parity/adm.pt`: the inputs (or the seeds that regenerate them) and the evaluator's outputs, which
`tests/test_adm_protocol.py` checks without TensorFlow. It also reads an .npz written the way arvision-sample writes
one with the evaluator's own npz reader.

    python experiments/parity/adm_evaluator.py --repo <guided-diffusion checkout>            # → parity.csv
    python experiments/parity/adm_evaluator.py --repo <guided-diffusion checkout> --fixture  # also the fixture

Run against openai/guided-diffusion @22e0df8 with tensorflow-cpu 2.21.0, numpy 2.4.6 and scipy 1.17.1 (the scipy of
arvision's environment: FID goes through scipy's sqrtm). The evaluator imports TensorFlow, scipy, requests and tqdm;
TensorFlow need not be in arvision's environment, e.g.:

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu scipy==<arvision's> requests tqdm
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/tfenv/lib/python3.11/site-packages/arvision_env.pth
    /tmp/tfenv/bin/python experiments/parity/adm_evaluator.py --repo <checkout> --fixture

Two things of the evaluator are adapted, not changed: numpy ≥ 1.24 removed the alias `np.bool` it uses (it is set
back to `bool`, the same type), and the IS graph is built from a given weight matrix instead of the Inception
graph's `softmax/logits/MatMul` weight (`_create_softmax_graph` otherwise downloads the graph).

Precision/recall: the evaluator computes distances in float16 with TF, and TF sums the fp16 squared norms in fp16
in an order that depends on the device (CPU: about a quarter of the norms differ in the last bit from the exactly
rounded sum arvision uses; the GPU kernels reduce in yet another order). So radii differ by a float16 step or two
and a few points near a ball's edge can change side: those rows have tolerances, and the fixture keeps this
evaluator's (TensorFlow on CPU) numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO_ROOT, Row, commit_of, official_imports, save_fixture, write_rows  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "src"))
from arvision.evaluation import to_uint8  # noqa: E402
from arvision.metrics import adm  # noqa: E402

FAMILY = "adm"


def pool_like(seed: int, n: int, d: int, *, loc: float, scale: float) -> torch.Tensor:
    """Non-negative features shaped like pool_3's (squared norms of a few hundred at d = 2048); the test regenerates
    them from the same arguments."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=generator) * scale + loc).clamp_min(0)


def load_evaluator(repo: Path):
    try:
        import tensorflow.compat.v1 as tf
    except ImportError:
        raise SystemExit("the ADM evaluator needs TensorFlow: run this with a Python that has tensorflow (see the "
                         "docstring)") from None
    if "bool" not in np.__dict__:
        np.bool = bool  # removed alias the evaluator still uses; the same type
    with official_imports(repo):
        from evaluations import evaluator
    return evaluator, tf


def official_inception_score(evaluator, tf, features: np.ndarray, weights: np.ndarray, split_size: int) -> float:
    session = tf.Session(graph=tf.Graph())
    ev = evaluator.Evaluator.__new__(evaluator.Evaluator)  # __init__ would download the Inception graph
    ev.sess, ev.softmax_batch_size = session, 512
    with session.graph.as_default():
        ev.softmax_input = tf.placeholder(tf.float32, shape=[None, features.shape[1]])
        ev.softmax = tf.nn.softmax(tf.matmul(ev.softmax_input, tf.constant(weights)))
    return ev.compute_inception_score(features, split_size=split_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of openai/guided-diffusion")
    parser.add_argument("--fixture", action="store_true", help="also write tests/fixtures/parity/adm.pt")
    args = parser.parse_args()
    evaluator, tf = load_evaluator(args.repo)
    commit = commit_of(args.repo)
    rows: list[Row] = []
    fixture: dict = {"official_commit": commit, "fid": [], "is": [], "pr": []}

    def row(model: str, size: str, output: str, ours: float, official: float, tolerance: float) -> None:
        rows.append(Row(FAMILY, model, size, output, abs(float(ours) - float(official)), tolerance, commit))

    # ---------------------------------------------------------------- statistics and Fréchet distance
    rng = np.random.default_rng(0)
    small_ref = rng.normal(0.3, 0.5, (500, 64)).astype(np.float32)
    small_smp = rng.normal(0.35, 0.55, (400, 64)).astype(np.float32)
    tiny_ref, tiny_smp = small_ref[:40], small_smp[:30]          # fewer images than dimensions: singular Σ
    shift = np.diag(np.ones(7), 1)                                # Σ1·Σ2 nilpotent: sqrtm is not finite
    fid_cases = [
        ("64-d, 400 vs 500 images", small_smp, small_ref),
        ("64-d, 30 vs 40 images (singular)", tiny_smp, tiny_ref),
        ("64-d, identical statistics", small_ref, small_ref),
    ]
    for name, samples, reference in fid_cases:
        official_s = evaluator.Evaluator.compute_statistics(None, samples)
        official_r = evaluator.Evaluator.compute_statistics(None, reference)
        ours_s, ours_r = adm.statistics(samples), adm.statistics(reference)
        row("statistics", "tiny", f"mu, {name}", 0, np.abs(ours_s.mu - official_s.mu).max(), 0)
        row("statistics", "tiny", f"sigma, {name}", 0, np.abs(ours_s.sigma - official_s.sigma).max(), 0)
        official = official_s.frechet_distance(official_r)
        row("frechet_distance", "tiny", f"FID {name}", adm.frechet_distance(ours_s, ours_r), official, 1e-9)
        fixture["fid"].append({"name": name, "mu1": torch.from_numpy(official_s.mu),
                               "sigma1": torch.from_numpy(official_s.sigma), "mu2": torch.from_numpy(official_r.mu),
                               "sigma2": torch.from_numpy(official_r.sigma), "fid": float(official)})
    special = [("eps retry (nilpotent product)", shift, np.eye(8)),
               ("imaginary part (Σ = −I)", -np.eye(8), np.eye(8))]
    for name, sigma1, sigma2 in special:
        mu = np.zeros(8)
        try:
            official: float | None = evaluator.FIDStatistics(mu, sigma1).frechet_distance(
                evaluator.FIDStatistics(mu, sigma2))
        except ValueError:
            official = None
        try:
            ours: float | None = adm.frechet_distance(adm.FrechetStats(mu, sigma1), adm.FrechetStats(mu, sigma2))
        except adm.AdmError:
            ours = None
        same = (official is None) == (ours is None)
        diff = 0.0 if official is None and ours is None else (abs(ours - official) if same else float("inf"))
        rows.append(Row(FAMILY, "frechet_distance", "tiny", f"FID {name}" + (" (raises)" if official is None
                                                                             else ""), diff, 1e-9, commit))
        fixture["fid"].append({"name": name, "mu1": torch.from_numpy(mu), "sigma1": torch.from_numpy(sigma1),
                               "mu2": torch.from_numpy(mu), "sigma2": torch.from_numpy(sigma2),
                               "fid": None if official is None else float(official)})
    # A larger case regenerated from seeds by the test (its statistics would make the fixture megabytes).
    spec = {"name": "256-d pool_3-like, 900 vs 1200 images", "d": 256, "n_samples": 900, "n_reference": 1200,
            "seed_samples": 11, "seed_reference": 12, "samples_loc": 0.32, "samples_scale": 0.55,
            "reference_loc": 0.3, "reference_scale": 0.5}
    samples = pool_like(spec["seed_samples"], spec["n_samples"], spec["d"], loc=spec["samples_loc"],
                        scale=spec["samples_scale"]).numpy()
    reference = pool_like(spec["seed_reference"], spec["n_reference"], spec["d"], loc=spec["reference_loc"],
                          scale=spec["reference_scale"]).numpy()
    official_s = evaluator.Evaluator.compute_statistics(None, samples)
    official_r = evaluator.Evaluator.compute_statistics(None, reference)
    official = official_s.frechet_distance(official_r)
    ours = adm.frechet_distance(adm.statistics(samples), adm.statistics(reference))
    row("statistics + frechet_distance", "256-d", f"FID {spec['name']}", ours, official, 1e-9)
    fixture["fid_seeded"] = {**spec, "fid": float(official), "checksum": float(samples.sum(dtype=np.float64)
                                                                               + reference.sum(dtype=np.float64))}

    # ---------------------------------------------------------------- Inception Score
    features = rng.normal(0, 1, (2600, 32)).astype(np.float32)
    weights = rng.normal(0, 0.6, (32, 100)).astype(np.float32)
    logits = torch.from_numpy(features).mm(torch.from_numpy(weights))  # what torch-fidelity's logits_unbiased does
    for split_size in (500, 5000):
        official = official_inception_score(evaluator, tf, features, weights, split_size)
        row("inception_score", "tiny", f"IS, 2600 images, splits of {split_size}",
            adm.inception_score(logits, split_size=split_size), official, 1e-5 * official)
        fixture["is"].append({"split_size": split_size, "is": float(official)})
    fixture["is_inputs"] = {"features": torch.from_numpy(features), "weights": torch.from_numpy(weights)}

    # ---------------------------------------------------------------- precision / recall
    session = tf.Session(graph=tf.Graph())
    pr_specs = [
        {"name": "2048-d, 1000 ref vs 1200 samples, one block", "row": 10000, "col": 10000, "boost": 0},
        {"name": "2048-d, blocks of 256 ref × 384 samples", "row": 256, "col": 384, "boost": 0},
        {"name": "2048-d, blocks of 256 × 384, 100 ref rows ×20 (fp16 overflow → fp32)", "row": 256, "col": 384,
         "boost": 100},
    ]
    for spec in pr_specs:
        ref = pool_like(1, 1000, 2048, loc=0.3, scale=0.5)
        smp = pool_like(2, 1200, 2048, loc=0.3, scale=0.5)
        ref[: spec["boost"]] *= 20
        estimator = evaluator.ManifoldEstimator(session, row_batch_size=spec["row"], col_batch_size=spec["col"])
        ref_np, smp_np = ref.numpy(), smp.numpy()
        official_rr = estimator.manifold_radii(ref_np)
        official_sr = estimator.manifold_radii(smp_np)
        precision, recall = (float(x[0]) for x in estimator.evaluate_pr(ref_np, official_rr, smp_np, official_sr))
        ours_rr = adm.manifold_radii(ref, row_batch=spec["row"], col_batch=spec["col"])
        ours_sr = adm.manifold_radii(smp, row_batch=spec["row"], col_batch=spec["col"])
        ours_p, ours_r = adm.precision_recall(ref, smp, row_batch=spec["row"], col_batch=spec["col"])
        for which, ours_radii, official_radii in (("ref", ours_rr, official_rr), ("sample", ours_sr, official_sr)):
            official_radii = torch.from_numpy(official_radii[:, 0])
            relative = (ours_radii - official_radii).abs() / official_radii.clamp_min(1e-12)
            differ = int((ours_radii != official_radii).sum())
            # 2e-3: two float16 steps (2^-10 relative each at most)
            row("manifold_radii", "2048-d", f"{which} radii, relative ({differ} of {len(official_radii)} differ), "
                f"{spec['name']}", float(relative.max()), 0, 2e-3)
        row("precision_recall", "2048-d", f"precision {precision:.4f}, {spec['name']}", ours_p, precision, 0.01)
        row("precision_recall", "2048-d", f"recall {recall:.4f}, {spec['name']}", ours_r, recall, 0.01)
        fixture["pr"].append({**spec, "n_ref": 1000, "n_samples": 1200, "d": 2048, "seed_ref": 1, "seed_samples": 2,
                              "ref_loc": 0.3, "ref_scale": 0.5, "samples_loc": 0.3, "samples_scale": 0.5,
                              "precision": precision, "recall": recall,
                              "ref_radii": torch.from_numpy(official_rr[:, 0].copy()),
                              "sample_radii": torch.from_numpy(official_sr[:, 0].copy()),
                              "checksum": float(ref.double().sum() + smp.double().sum())})

    # ---------------------------------------------------------------- the samples layout arvision-sample writes
    images = torch.rand(10, 3, 24, 20) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npz"
        np.savez(path, arr_0=to_uint8(images), labels=np.arange(10))  # as arvision.export.export_samples
        with evaluator.open_npz_array(str(path), "arr_0") as reader:
            streamed = isinstance(reader, evaluator.StreamingNpzArrayReader)
            official_batches = np.concatenate(list(reader.read_batches(4)))
        ours_batches = np.concatenate(list(adm.NpzImages(path).batches(4)))
    rows.append(Row(FAMILY, "npz reader", "tiny", "arvision-sample's arr_0 read by the evaluator's "
                    f"{'streaming' if streamed else 'in-memory'} reader vs NpzImages",
                    float((official_batches != ours_batches).sum()) if official_batches.shape == ours_batches.shape
                    else float("inf"), 0, commit))

    write_rows(FAMILY, rows)
    if args.fixture:
        save_fixture(FAMILY, fixture)


if __name__ == "__main__":
    main()
