"""RAR as an option of the raster generator: training orders, the annealing of r, target-aware positions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.generators import IncompatibleTokenizer, RasterGenerator
from arvision.generators.raster import draw_orders, random_order_ratio
from arvision.tasks import GeneratorTask
from arvision.tokenizers.base import TokenSpec
from tests.conftest import run_crashing_at

VQ = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(4, 4), dim=8, vocab_size=32, image_size=16,
               image_channels=1)
RVQ = TokenSpec(name="rvq", kind="discrete", layout="depth", grid=(2, 2), dim=8, vocab_size=16, depth=3,
                image_size=8, image_channels=1)
NUM_CLASSES = 10
N = 16  # tokens of VQ's 4×4 grid


def make(*, order: str = "annealed", seed: int = 0, **kwargs) -> RasterGenerator:
    """A small RAR model in train mode without dropout (class dropout off), so a forward is a function of its inputs;
    the zero-initialised output layer and the target-aware rows get visible weights."""
    torch.manual_seed(seed)
    kwargs = {"dim": 32, "depth": 2, "heads": 4, "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0,
              "class_dropout": 0.0, **kwargs}
    model = RasterGenerator(spec=VQ, num_classes=NUM_CLASSES, order=order, target_aware=True, **kwargs)
    with torch.no_grad():
        model.output.weight.normal_(std=0.5)
        model.target_aware_pos_embed.normal_(std=0.5)
    return model.train()


def batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32, (b, 4, 4), generator=gen), torch.randint(0, NUM_CLASSES, (b,), generator=gen)


def random_orders(b: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=gen) for _ in range(b)])


# --- the orders ---------------------------------------------------------------------------------------------------


@given(st.integers(1, 12), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_every_drawn_order_is_a_permutation_and_raster_unless_drawn_random(b, length, ratio, seed):
    torch.manual_seed(seed)
    orders = draw_orders(b, length, torch.tensor(ratio), torch.device("cpu"))
    assert orders.shape == (b, length) and orders.dtype == torch.long
    assert torch.equal(orders.sort(dim=1).values, torch.arange(length).expand(b, length))
    if ratio == 0.0:
        assert torch.equal(orders, torch.arange(length).expand(b, length))


def test_a_random_order_is_drawn_with_probability_r_and_every_permutation_equally_often():
    torch.manual_seed(0)
    rows = 30_000
    for ratio in (0.0, 0.3, 1.0):
        orders = draw_orders(rows, 8, torch.tensor(ratio), torch.device("cpu"))
        shuffled = (orders != torch.arange(8)).any(dim=1).float().mean().item()
        # a random permutation of 8 is the raster one with probability 1/8! ≈ 2.5e-5
        assert shuffled == pytest.approx(ratio * (1 - 1 / math.factorial(8)), abs=0.01)
    perms = draw_orders(rows, 3, torch.tensor(1.0), torch.device("cpu"))
    counts = torch.unique(perms, dim=0, return_counts=True)[1]
    assert len(counts) == 6 and (counts - rows / 6).abs().max() < 5 * math.sqrt(rows / 6)  # each ≈ 1/6


# --- the schedule -------------------------------------------------------------------------------------------------


def test_the_ratio_is_rar_s_schedule_at_its_boundaries():
    # RAR's defaults: 250k steps, annealing from step 125k (epoch 200) to 187.5k (epoch 300)
    start, end = 125_000, 187_500
    expected = {0: 1.0, start - 1: 1.0, start: 1.0, start + 1: 1 - 1 / 62_500, 156_250: 0.5, end - 1: 1 / 62_500,
                end: 0.0, end + 1: 0.0, 249_999: 0.0}
    for step, r in expected.items():
        assert random_order_ratio(step, start=start, end=end) == pytest.approx(r, abs=1e-12), step
    assert [random_order_ratio(s, start=3, end=3) for s in (2, 3, 4)] == [1.0, 0.0, 0.0]  # a switch


def test_set_progress_anneals_only_the_annealed_order_in_fractions_of_the_run():
    model = make(anneal_start=0.5, anneal_end=0.75)
    assert model.random_ratio.item() == 1.0  # before any step (arvision-bench): r at step 0
    for step, r in {0: 1.0, 349: 1.0, 350: 1.0, 437: 1 - 87 / 175, 525: 0.0, 699: 0.0}.items():
        model.set_progress(step=step, total_steps=700)
        assert model.random_ratio.item() == pytest.approx(r, abs=1e-6), step
    fixed = {"random": make(order="random"), "raster": make(order="raster")}
    for step in (0, 400, 699):
        for order, model in fixed.items():
            model.set_progress(step=step, total_steps=700)
            assert model.random_ratio.item() == (1.0 if order == "random" else 0.0)
    assert make(order="raster").training_orders(batch()[0]) is None  # raster draws nothing from the RNG


def test_the_training_task_tells_the_generator_its_step_before_the_loss(monkeypatch):
    model = make()
    task = GeneratorTask(generator=model, max_steps=8)
    seen = []
    monkeypatch.setattr(RasterGenerator, "loss", lambda self, t, y: seen.append(self.random_ratio.item())
                        or {"loss": torch.zeros((), requires_grad=True)})
    monkeypatch.setattr(GeneratorTask, "global_step", property(lambda self: 5))
    monkeypatch.setattr(GeneratorTask, "log_dict", lambda *a, **k: None)
    monkeypatch.setattr(GeneratorTask, "log", lambda *a, **k: None)
    task.training_step(batch(), 0)
    assert seen == [pytest.approx(1 - (5 - 4) / 2)]  # step 5 of 8: between 0.5·8 and 0.75·8


def test_bad_settings_fail_with_one_line_naming_them():
    with pytest.raises(ValueError, match="order must be one of"):
        RasterGenerator(spec=VQ, num_classes=NUM_CLASSES, order="spiral")
    with pytest.raises(ValueError, match="anneal_start=0.8, anneal_end=0.5"):
        RasterGenerator(spec=VQ, num_classes=NUM_CLASSES, anneal_start=0.8, anneal_end=0.5)
    with pytest.raises(ValueError, match="order=random needs target_aware=true"):
        RasterGenerator(spec=VQ, num_classes=NUM_CLASSES, order="random")
    with pytest.raises(IncompatibleTokenizer, match="order=annealed needs a tokenizer with one token per grid"):
        RasterGenerator(spec=RVQ, num_classes=NUM_CLASSES, order="annealed", target_aware=True)


# --- the network in a drawn order ---------------------------------------------------------------------------------


def test_the_loss_is_the_cross_entropy_on_the_targets_in_the_drawn_order():
    model = make(order="random")
    tokens, labels = batch()
    torch.manual_seed(3)
    out = model.loss(tokens, labels)
    torch.manual_seed(3)
    orders = model.training_orders(tokens)
    assert orders is not None and not torch.equal(orders, torch.arange(N).expand(3, N))
    logits = model(tokens, labels, orders)
    targets = model.flatten(tokens).gather(1, orders)
    assert torch.equal(out["loss"], F.cross_entropy(logits.reshape(-1, 32), targets.flatten()))
    assert torch.equal(out["accuracy"], (logits.argmax(-1) == targets).float().mean())
    # the raster targets would give another value: the targets follow the order
    raster = F.cross_entropy(logits.reshape(-1, 32), model.flatten(tokens).flatten())
    assert not torch.isclose(out["loss"], raster)


def test_each_slot_sees_exactly_the_tokens_before_it_in_the_order():
    model = make()
    tokens, labels = batch()
    orders = random_orders(3)
    base = model(tokens, labels, orders)
    k = 6  # change the token at position orders[:, k] (the one slot k + 1 is fed)
    changed = model.flatten(tokens).clone()
    rows = torch.arange(3)
    changed[rows, orders[:, k]] = (changed[rows, orders[:, k]] + 1) % 32
    out = model(model.unflatten(changed), labels, orders)
    assert torch.equal(out[:, :k + 1], base[:, :k + 1])
    assert (out[:, k + 1:] - base[:, k + 1:]).abs().amax(dim=-1).gt(1e-4).all()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_target_aware_rows_follow_the_target_and_position_rows_follow_the_token(positions):
    """Slot s adds target-aware row orders[s]; the token at position p keeps position p's own RoPE angle or learned
    row (p + 1) in whatever slot it is fed. Perturbing one row changes exactly the slots from the one using it."""
    model = make(positions=positions)
    tokens, labels = batch()
    orders = random_orders(3)
    base = model(tokens, labels, orders)
    p = 5
    slot = (orders == p).float().argmax(dim=1)  # per row, the slot whose target is position p
    original = model.target_aware_pos_embed.detach().clone()
    with torch.no_grad():
        model.target_aware_pos_embed[p] += 1.0
    out = model(tokens, labels, orders)
    for row in range(3):
        s = int(slot[row])
        assert torch.equal(out[row, :s], base[row, :s]) and (out[row, s] - base[row, s]).abs().max() > 1e-4
    if positions == "learned":
        with torch.no_grad():
            model.target_aware_pos_embed.copy_(original)
            model.pos_embeddings[p + 1] += 1.0
        out = model(tokens, labels, orders)
        for row in range(3):  # the token of position p is fed at slot s + 1 (slot s predicts it)
            s = int(slot[row])
            if s + 1 < N:
                assert torch.equal(out[row, :s + 1], base[row, :s + 1])
                assert (out[row, s + 1] - base[row, s + 1]).abs().max() > 1e-4
            else:
                assert torch.equal(out[row], base[row])  # the last target is never fed


def test_rope_follows_the_token_in_a_drawn_order():
    """A 1-layer model: slot s's query is rotated by the angle of the token it holds, each key by its token's. Feeding
    the same (token, position, target) inputs in a drawn order or building the rotations by hand agrees."""
    model = make(depth=1)
    tokens, labels = batch()
    orders = random_orders(3)
    out = model(tokens, labels, orders)
    seq = model.flatten(tokens).gather(1, orders)
    x = torch.cat([model.cls_embedding(labels)[:, None], model.embed_tokens(seq[:, :-1])], dim=1)
    x = x + model.target_aware_pos_embed[orders]
    layer = model.layers[0]
    by_hand = []
    for row in range(3):  # one row at a time with its own (n, ·, 2) table: the plain raster code path
        table = model.rope[torch.cat([torch.zeros(1, dtype=torch.long), orders[row, :-1] + 1])]
        y = layer(x[row:row + 1], rope=table, is_causal=True)
        by_hand.append(model.output(model.norm(y)).float())
    assert torch.allclose(out, torch.cat(by_hand), atol=1e-5)


# --- r = 0: raster, and sampling ----------------------------------------------------------------------------------


def test_at_r_zero_the_target_aware_rows_are_the_raster_next_positions():
    model = make()
    tokens, labels = batch()
    model.set_progress(step=9, total_steps=10)  # past anneal_end: r = 0
    torch.manual_seed(0)
    orders = model.training_orders(tokens)
    assert orders is not None and torch.equal(orders, torch.arange(N).expand(3, N))
    assert torch.allclose(model(tokens, labels, orders), model(tokens, labels), atol=1e-6)
    # the raster path: slot s adds row s, exactly what a model gets by adding those rows to its inputs by hand
    with torch.no_grad():
        x = torch.cat([model.cls_embedding(labels)[:, None],
                       model.embed_tokens(model.flatten(tokens)[:, :-1])], dim=1)
        plain = make(order="raster")
        plain.load_state_dict(model.state_dict())
        plain.target_aware = False
        expected = plain.decode(x + model.target_aware_pos_embed)
    assert torch.allclose(model(tokens, labels), expected, atol=1e-6)
    model.eval()  # eval mode (the test loss) scores the raster order whatever r is
    model.set_progress(step=0, total_steps=10)
    assert model.training_orders(tokens) is None


@pytest.mark.parametrize("chunks", [[1] * 16, [5, 1, 3, 1, 6]])
def test_cached_decoding_of_a_target_aware_model_matches_teacher_forcing(chunks):
    model = make().eval()
    tokens, labels = batch()
    full = model(tokens, labels)
    with torch.no_grad():
        seq = model.flatten(tokens)
        x = torch.cat([model.cls_embedding(labels)[:, None], model.embed_tokens(seq[:, :-1])], dim=1)
        caches, start, parts = model.new_caches(), 0, []
        for n in chunks:
            parts.append(model.decode(x[:, start:start + n], start=start, caches=caches))
            start += n
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="without caches"):
        model.decode(x[:, :4], start=0, caches=model.new_caches(), orders=random_orders(3))


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_static_steps_and_sampling_of_a_target_aware_model_equal_the_eager_ones(cfg):
    model = make().eval()
    tokens, labels = batch()
    full = model(tokens, labels)
    with torch.inference_mode():  # as in `sample`, which reuses these held caches
        seq = model.flatten(tokens)
        x = torch.cat([model.cls_embedding(labels)[:, None], model.embed_tokens(seq[:, :-1])], dim=1)
        static, positions = model.static_caches(3, torch.device("cpu")), torch.arange(N)
        steps = [model.static_step(x[:, t:t + 1], positions[t:t + 1], static) for t in range(N)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    eager = model.sample(labels, cfg=cfg, generator=torch.Generator().manual_seed(0))
    fixed = model.sample(labels, cfg=cfg, generator=torch.Generator().manual_seed(0), decode="static")
    assert torch.equal(eager, fixed) and eager.shape == (3, 4, 4) and not model.training


# --- training runs ------------------------------------------------------------------------------------------------


def test_a_resumed_generator_draws_the_orders_of_the_uninterrupted_run():
    """r is a function of the step alone and the orders come from the torch RNG, which a checkpoint stores
    (`ResumableTask`): a fresh model given the saved RNG state and the step draws what the uninterrupted one drew."""
    tokens = batch(b=6)[0]
    straight, model = [], make()
    torch.manual_seed(0)
    for step in range(8):
        model.set_progress(step=step, total_steps=8)
        straight.append(model.training_orders(tokens))
    model = make(seed=5)
    torch.manual_seed(0)
    for step in range(3):
        model.set_progress(step=step, total_steps=8)
        model.training_orders(tokens)
    saved = torch.get_rng_state()
    torch.manual_seed(123)  # whatever ran in between
    resumed = make(seed=7)
    torch.set_rng_state(saved)
    for step in range(3, 8):
        resumed.set_progress(step=step, total_steps=8)
        assert torch.equal(resumed.training_orders(tokens), straight[step]), step
    shuffled = [(o != torch.arange(N)).any(dim=1).sum().item() for o in straight]
    assert shuffled[:4] == [6] * 4 and shuffled[6:] == [0, 0]  # r = 1 until step 4, 0 from step 6


def test_a_killed_rar_run_resumes_inside_the_annealing_to_the_same_weights(tiny_cfg, tmp_path, monkeypatch):
    from arvision import pipeline

    seen: list[tuple[float, torch.Tensor | None]] = []
    draw = RasterGenerator.training_orders

    def recorded(self, tokens):
        orders = draw(self, tokens)
        seen.append((self.random_ratio.item(), orders))
        return orders

    monkeypatch.setattr(RasterGenerator, "training_orders", recorded)
    overrides = ("paradigm=rar", "generator.train.max_steps=8", "checkpoint_every=2", "evaluate=false",
                 "generator.model.anneal_start=0.25", "generator.model.anneal_end=0.75")
    pipeline.run(tiny_cfg(*overrides), tmp_path / "straight")
    straight, seen[:] = list(seen), []
    assert [r for r, _ in straight] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    run_crashing_at(monkeypatch, tiny_cfg(*overrides), tmp_path / "resumed", 5)
    monkeypatch.setattr(RasterGenerator, "training_orders", recorded)  # run_crashing_at restored only its own patch
    seen[:] = []
    pipeline.run(tiny_cfg(*overrides), tmp_path / "resumed")  # from the checkpoint of step 4
    assert [r for r, _ in seen] == [r for r, _ in straight[4:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, straight[4:]))
    a = torch.load(tmp_path / "straight" / "generator.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "generator.pt", weights_only=True)
    for part in ("generator", "ema"):
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-6), (part, key)


def test_a_tiny_rar_run_trains_samples_and_evaluates(tiny_cfg, tmp_path):
    from arvision import pipeline
    from tests.conftest import untrained_test_loss

    cfg = tiny_cfg("paradigm=rar", "generator.train.max_steps=12")
    results = pipeline.run(cfg, tmp_path / "run")
    assert results["generator"] == "rar" and results["config"]["generator"]["model"]["order"] == "annealed"
    gen = results["metrics"]["generator"]
    assert math.isfinite(gen["fid"]["value"]) and gen["nfe_per_image"] == 64  # raster sampling: one pass a token
    assert gen["test_loss"]["value"] < untrained_test_loss(cfg, results) - 0.05  # scored in raster order
    blob = torch.load(Path(tmp_path / "run" / "generator.pt"), weights_only=True)
    assert "target_aware_pos_embed" in blob["ema"] and "random_ratio" not in blob["ema"]


# --- fast paths ---------------------------------------------------------------------------------------------------


def test_a_rar_training_loss_reads_nothing_on_the_host_and_copies_nothing_there(monkeypatch):
    """On the meta device (no data to read): drawing the orders, the coin against r and the gathers stay on the
    device, so a GPU step never waits for the host."""
    from tests.test_fast_paths import NoBlockingHostToDeviceCopies, NoHostReads, refuse_host_data

    model = make().to("meta")
    model.set_progress(step=5, total_steps=8)
    tokens = torch.zeros(4, 4, 4, dtype=torch.long, device="meta")
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, refuse_host_data(getattr(torch, name)))
    with NoBlockingHostToDeviceCopies(), NoHostReads():
        model.loss(tokens, labels)["loss"].backward()


@pytest.mark.slow  # ≈ 15 s of CPU compilation
def test_compiled_decode_of_a_target_aware_model_samples_the_static_tokens():
    model = make().eval()
    labels = torch.tensor([0, 1])
    compiled = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(3), decode="compiled")
    static = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(3), decode="static")
    assert torch.equal(compiled, static)


@pytest.mark.slow  # ≈ 45 s of CPU compilation (forward and backward graphs)
@pytest.mark.filterwarnings("ignore:.*self.trainer.*")  # training_step's self.log without a Trainer
def test_a_compiled_rar_loss_is_not_recompiled_as_r_anneals(monkeypatch):
    """r lives in a buffer, so the compiled loss reads its value: annealing it through the run compiles nothing new."""
    from torch._dynamo.utils import counters

    model = make()
    task = GeneratorTask(generator=model, compile=True, max_steps=8)
    steps = iter(range(8))
    monkeypatch.setattr(GeneratorTask, "global_step", property(lambda self: next(steps)))
    task.training_step(batch(b=4), 0).backward()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(7):  # r = 1, 1, 1, 0.5, 0, 0, 0 at steps 1 … 7
        loss = task.training_step(batch(b=4), 0)
        assert math.isfinite(loss.item())
    assert counters["stats"]["unique_graphs"] == graphs
