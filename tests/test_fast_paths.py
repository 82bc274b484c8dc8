"""Fast paths: each switch computes the same function as the plain path, and sampling loops never read a
tensor on the host.

- static KV cache + position mask (`nn.attention.StaticKVCache`) = the growing `KVCache`, for any chunking, GQA;
- raster `sample(decode=static|compiled)` = `decode=eager`: per-step logits and sampled tokens, CFG on and off,
  grid, flattened-depth and depth-head RVQ layouts; `compiled` builds one graph for every step;
- next-scale `sample(decode=static|compiled)` = `decode=eager`: per-scale logits and tokens (VAR, FlexVAR, CFG on
  and off); `compiled` builds one graph per scale and none on a second run;
- no host synchronisation: every generator samples (a) with scalar reads of tensors forbidden (`.item()`, `bool()`,
  `float()`, `nonzero`…, which on CUDA each wait for the device) and (b) on the meta device, where tensors have no
  data at all, so any host read of a device tensor (`.tolist()` included) fails, and where host data copied onto
  the device without `non_blocking` (on CUDA: a stream synchronisation) is refused; training losses likewise;
- `GeneratorTask(compile=True)`: the compiled training step gives the eager loss and gradients.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
import functools
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from arvision import bench
from arvision.generators.acdit import ACDiTGenerator
from arvision.generators.flowar import FlowARGenerator
from arvision.generators.next_scale import NextScaleGenerator
from arvision.generators.raster import RasterGenerator
from arvision.nn.attention import Attention, KVCache, StaticKVCache, causal_mask, position_mask
from arvision.nn.rope import grid_positions, rope_2d
from arvision.tasks.generator_task import GeneratorTask
from arvision.tokenizers.base import TokenSpec
from arvision.tokenizers.msvq import MultiScaleVQTokenizer
from arvision.tokenizers.vq import VQTokenizer
from tests.test_next_scale import HeadCalls

NUM_CLASSES = 3
GRID = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(4, 4), dim=8, vocab_size=32)
DEPTH = TokenSpec(name="rvq", kind="discrete", layout="depth", grid=(3, 3), dim=8, vocab_size=32, depth=2)
VAE = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(8, 8), dim=4, image_size=32, image_channels=1)
NET = dict(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
           code_dim=4)
LAYOUTS = {"grid": (GRID, "flatten"), "rvq_flat": (DEPTH, "flatten"), "rvq_head": (DEPTH, "head")}


def raster(layout: str = "grid", *, kv_heads: int | None = None, seed: int = 0) -> RasterGenerator:
    """A small eval-mode raster model whose zero-initialised output is replaced, so logits differ between tokens."""
    spec, depth_mode = LAYOUTS[layout]
    torch.manual_seed(seed)
    model = RasterGenerator(spec=spec, num_classes=NUM_CLASSES, dim=32, depth=2, heads=4, kv_heads=kv_heads,
                            depth_mode=depth_mode, head_depth=1, code_embeddings="learned")  # no tokenizer attached
    with torch.no_grad():
        out = model.depth_head.output if depth_mode == "head" else model.output
        out.weight.normal_(std=1.0)
    return model.eval()


# --- the static KV cache ------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(start=st.integers(0, 10), n=st.integers(1, 5), extra=st.integers(0, 6))
def test_position_mask_is_the_causal_mask_padded_with_hidden_slots(start: int, n: int, extra: int) -> None:
    max_len = start + n + extra
    mask = position_mask(torch.arange(start, start + n), max_len)
    assert mask.shape == (n, max_len)
    assert torch.equal(mask[:, :start + n], causal_mask(n, start + n)) and not mask[:, start + n:].any()


@settings(max_examples=20, deadline=None)
@given(chunks=st.lists(st.integers(1, 4), min_size=1, max_size=5), kv_heads=st.sampled_from([1, 2, 4]))
def test_static_cache_attention_equals_the_growing_cache(chunks: list[int], kv_heads: int) -> None:
    """Chunk by chunk (a prefill of several tokens, then single ones), GQA included: the same outputs, although the
    static storage starts full of stale values that only the position mask keeps out."""
    torch.manual_seed(0)
    total = sum(chunks)
    attn = Attention(32, 4, kv_heads=kv_heads).eval()
    x = torch.randn(2, total, 32)
    rope = rope_2d(grid_positions(1, total), 8)
    growing = KVCache(total)
    static = StaticKVCache(2, kv_heads, total + 3, 8, dtype=torch.float32)
    static.k.normal_(), static.v.normal_()  # stale values from an earlier run: must not leak
    start = 0
    with torch.no_grad():
        for n in chunks:
            span = slice(start, start + n)
            positions = torch.arange(start, start + n)
            want = attn(x[:, span], rope=rope[span], cache=growing, is_causal=True)
            got = attn(x[:, span], rope=rope[span], cache=static.at(positions),
                       attn_mask=position_mask(positions, static.max_len))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            start += n


def test_static_cache_is_allocated_zeroed_and_refuses_is_causal() -> None:
    cache = StaticKVCache(1, 2, 5, 4, dtype=torch.float32)
    assert not cache.k.any() and not cache.v.any()  # 0·NaN = NaN: masked slots must hold finite values
    cache.k.fill_(float("nan")), cache.reset()
    assert not cache.k.isnan().any()
    with pytest.raises(ValueError, match="position_mask"):
        Attention(8, 2)(torch.randn(1, 1, 8), cache=cache.at(torch.tensor([0])), is_causal=True)


# --- raster decode modes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [2, 4])  # 4 = the 2B rows of a guided batch
def test_static_step_gives_the_eager_logits_at_every_slot(layout: str, rows: int) -> None:
    """Teacher-force one token sequence through both: the same logits (depth head: the same context) per step."""
    model = raster(layout, kv_heads=2)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (rows, *model.spec.grid) + ((2,) if layout != "grid" else ()), generator=gen)
    seq = model.flatten(tokens)
    labels = torch.arange(rows) % (NUM_CLASSES + 1)
    eager, static = model.new_caches(), model.static_caches(rows, torch.device("cpu"))
    positions = torch.arange(model.seq_len)
    with torch.inference_mode():
        x = model.cls_embedding(labels)[:, None]
        for t in range(model.seq_len):
            want = model.decode(x, start=t, caches=eager)
            got = model.static_step(x, positions[t:t + 1], static)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            x = model.embed_tokens(seq[:, t:t + 1], offset=t)


SAMPLINGS = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=1.0),
             "filtered": dict(temperature=0.8, top_k=8, top_p=0.9, cfg_interval=3)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_static_decode_samples_the_eager_tokens(layout: str, cfg: float, sampling: str) -> None:
    model = raster(layout)
    labels = torch.tensor([0, 2, 1])
    draw = {decode: model.sample(labels, cfg=cfg, generator=torch.Generator().manual_seed(5), decode=decode,
                                 **SAMPLINGS[sampling]) for decode in ("eager", "static")}
    assert torch.equal(draw["static"], draw["eager"])
    assert model.training is False


def test_decode_mode_is_checked_and_static_caches_live_outside_the_module() -> None:
    model = raster()
    with pytest.raises(ValueError, match="decode must be one of"):
        model.sample(torch.tensor([0]), decode="graph")
    model.sample(torch.tensor([0, 1]), cfg=2.0, decode="static")
    first = [c.k.data_ptr() for c in model.static_caches(4, torch.device("cpu"))]
    model.sample(torch.tensor([1, 2]), cfg=2.0, decode="static")  # the same shape reuses the same storage
    assert [c.k.data_ptr() for c in model.static_caches(4, torch.device("cpu"))] == first
    assert not any("cache" in k for k in model.state_dict())
    twin = copy.deepcopy(model)  # as the EMA copy is made: its own caches, the same samples
    labels = torch.tensor([2, 0])
    assert torch.equal(twin.sample(labels, cfg=2.0, temperature=0.0, decode="static"),
                       model.sample(labels, cfg=2.0, temperature=0.0, decode="eager"))
    assert twin.static_caches(4, torch.device("cpu"))[0].k.data_ptr() not in first


def test_compiled_decode_is_one_graph_and_samples_the_static_tokens() -> None:
    """torch.compile(fullgraph=True) of the static step on the CPU (on CUDA: CUDA-graph replay, same function):
    one graph serves every slot (the position is a tensor), and a second run compiles nothing."""
    from torch._dynamo.utils import counters
    model = raster("rvq_flat")
    labels = torch.tensor([0, 1])
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    compiled = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(3), decode="compiled")
    compile_seconds = time.perf_counter() - start
    assert counters["stats"]["unique_graphs"] - graphs == 1, "the step recompiled between slots"
    again = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(3), decode="compiled")
    assert counters["stats"]["unique_graphs"] - graphs == 1
    static = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(3), decode="static")
    assert torch.equal(compiled, static) and torch.equal(again, static)
    assert compile_seconds < 120  # ≈ 15 s on one CPU thread


# --- next-scale: static and compiled per-scale steps -----------------------------------------------------------------


def next_scale_model(residual: bool) -> NextScaleGenerator:
    tok = msvq() if residual else vq()
    torch.manual_seed(0)
    model = NextScaleGenerator(spec=tok.spec, num_classes=NUM_CLASSES, depth=2, dim=32, heads=2,
                               residual=residual).attach_tokenizer(copy.deepcopy(tok))
    with torch.no_grad():  # VAR's zero-initialised head would make every logit equal
        model.head.weight.normal_(std=1.0)
    return model.eval()


@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("residual", [True, False])
def test_next_scale_static_step_gives_the_eager_logits_at_every_scale(residual: bool, cfg: float) -> None:
    """Greedy, so both runs feed back the same maps: the logits of every scale match, and so do the tokens."""
    model = next_scale_model(residual)
    labels = torch.tensor([0, 2, 1])
    runs = {}
    for decode in ("eager", "static"):
        with HeadCalls(model) as head:
            runs[decode] = (model.sample(labels, cfg=cfg, temperature=0.0, decode=decode), head.outputs)
    (eager, eager_logits), (static, static_logits) = runs["eager"], runs["static"]
    assert len(static_logits) == len(eager_logits) == len(model.scales)
    for got, want in zip(static_logits, eager_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(static if residual else [static], eager if residual else [eager], strict=True):
        assert torch.equal(got, want)


def test_next_scale_compiled_step_is_one_graph_per_scale_and_samples_the_static_tokens() -> None:
    """torch.compile(fullgraph=True) of the static step on the CPU (on CUDA: CUDA-graph replay, same function): a
    graph per scale (their shapes differ), none compiled again on a second run, tokens those of `static`."""
    from torch._dynamo.utils import counters
    model = next_scale_model(True)
    labels = torch.tensor([0, 1])
    graphs = counters["stats"]["unique_graphs"]
    run = functools.partial(model.sample, labels, cfg=2.5, top_k=8)
    compiled = run(generator=torch.Generator().manual_seed(3), decode="compiled")
    assert counters["stats"]["unique_graphs"] - graphs == len(model.scales)
    again = run(generator=torch.Generator().manual_seed(3), decode="compiled")
    assert counters["stats"]["unique_graphs"] - graphs == len(model.scales), "a scale recompiled"
    static = run(generator=torch.Generator().manual_seed(3), decode="static")
    for a, b, c in zip(compiled, again, static, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_next_scale_decode_mode_is_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match="decode must be one of"):
        next_scale_model(True).sample(torch.tensor([0]), decode="graph")


# --- flowar: the head's precision in sampling, and its compiled evaluation ------------------------------------------


def flowar_model(spec: TokenSpec = VAE) -> FlowARGenerator:
    torch.manual_seed(0)
    return FlowARGenerator(spec=spec, num_classes=NUM_CLASSES, dim=32, depth=1, heads=2, head_width=32, head_depth=1,
                           head_heads=2, attention="sdpa").eval()


@pytest.mark.parametrize("head_fp32", [False, True])
def test_flowar_head_samples_under_the_ambient_autocast_unless_asked_for_fp32(head_fp32: bool) -> None:
    """FlowAR samples with its head under fp16 autocast (engine.py); training keeps the head in fp32."""
    model = flowar_model()
    seen: list[torch.dtype] = []
    hook = model.head.output.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.sample(torch.tensor([0, 1]), cfg=2.0, steps=3, head_fp32=head_fp32)
    hook.remove()
    assert seen and set(seen) == {torch.float32 if head_fp32 else torch.bfloat16}


def test_flowar_compiled_head_samples_the_eager_latents_and_compiles_once() -> None:
    from torch._dynamo.utils import counters
    model = flowar_model(replace(VAE, grid=(4, 4), image_size=16))  # scales 1, 2, 4: three graphs to compile
    run = functools.partial(model.sample, torch.tensor([0, 2]), cfg=1.0, steps=3)
    eager = run(generator=torch.Generator().manual_seed(5))
    compiled = run(generator=torch.Generator().manual_seed(5), decode="compiled")
    graphs = counters["stats"]["unique_graphs"]
    again = run(generator=torch.Generator().manual_seed(5), decode="compiled")
    assert counters["stats"]["unique_graphs"] == graphs, "a head evaluation recompiled"
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, compiled)
    with pytest.raises(ValueError, match="decode must be one of"):
        run(decode="static")


# --- no host synchronisation in sampling loops ----------------------------------------------------------------------


class NoHostReads(TorchDispatchMode):
    """Raises on the ops that copy a tensor's data to the host (on CUDA each one waits for the device)."""

    FORBIDDEN = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
                 "aten::masked_select", "aten::equal", "aten::allclose", "aten::unique")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.FORBIDDEN:
            raise AssertionError(f"host read in a sampling loop: {func}")
        return func(*args, **(kwargs or {}))


@functools.cache
def msvq() -> MultiScaleVQTokenizer:
    torch.manual_seed(0)
    return MultiScaleVQTokenizer(**NET, scales=(1, 2, 3, 4)).eval()


@functools.cache
def vq() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(**NET).eval()


def make_sampler(kind: str):
    """(generator, sampling kwargs) for every paradigm's sampling loop, at a tiny size."""
    torch.manual_seed(0)
    if kind.startswith("raster"):
        return raster(), {"decode": kind.split("_")[1]}
    if kind in ("var", "var_static", "flexvar"):
        tok = vq() if kind == "flexvar" else msvq()
        model = NextScaleGenerator(spec=tok.spec, num_classes=NUM_CLASSES, depth=1, dim=32, heads=2,
                                   residual=kind != "flexvar").attach_tokenizer(copy.deepcopy(tok))
        return model, {"top_k": 8, "top_p": 0.9, "decode": "static" if kind == "var_static" else "eager"}
    if kind.startswith("flowar"):
        model = FlowARGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=32, depth=1, heads=2, head_width=32,
                                head_depth=1, head_heads=2, attention="sdpa")
        return model, {"steps": 4, "sampler": kind.split("_", 1)[1]}
    model = ACDiTGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=32, depth=1, heads=2, block_size=16,
                           attention="sdpa")
    sampler = kind.split("_", 1)[1]
    return model, {"steps": 3, "sampler": sampler, **({"eta": 1.0} if sampler == "ddim" else {})}


SAMPLERS = ["raster_eager", "raster_static", "var", "var_static", "flexvar", "flowar_euler", "flowar_heun",
            "flowar_euler_maruyama", "acdit_dpm_solver_pp", "acdit_ddim"]


@pytest.mark.parametrize("kind", SAMPLERS)
def test_sampling_reads_no_tensor_scalar_on_the_host(kind: str, monkeypatch) -> None:
    model, sampling = make_sampler(kind)

    def item(self):
        raise AssertionError("Tensor.item() in a sampling loop")

    monkeypatch.setattr(torch.Tensor, "item", item)
    with NoHostReads():
        model.sample(torch.tensor([0, 2]), cfg=2.0, generator=torch.Generator().manual_seed(0), **sampling)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_sampling_runs_on_the_meta_device_where_no_data_can_be_read(kind: str, monkeypatch) -> None:
    """Meta tensors have shapes but no data: a sampling loop that ever reads a device tensor (.item(), .tolist(),
    a Python branch on a tensor, a data-dependent shape) fails here. One stand-in: autocast has no meta backend
    (`autocast(enabled=False)` blocks are a no-op here). The same run refuses blocking host-to-device copies (Python
    data made into device tensors, `.to(device)` of a host tensor), which on CUDA wait for the stream;
    `tests/test_gpu.py` checks the same with CUDA's own detector."""
    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: contextlib.nullcontext()
                        if device_type == "meta" else real_autocast(device_type, **kw))
    model, sampling = make_sampler(kind)  # its own tokenizer copy, which sampling moves to the meta device
    labels, model = torch.tensor([0, 2], device="meta"), model.to("meta")
    for name in ("tensor", "as_tensor"):  # built from host data: a blocking host-to-device copy on CUDA
        monkeypatch.setattr(torch, name, refuse_host_data(getattr(torch, name)))
    with NoBlockingHostToDeviceCopies():
        out = model.sample(labels, cfg=2.0, **sampling)
    assert (out[0] if isinstance(out, list) else out).device.type == "meta"


def refuse_host_data(make):
    """torch.tensor / torch.as_tensor of Python data onto a device copies it there and, on CUDA, waits for the
    stream (the copy is not `non_blocking`): inside a sampling loop that is a host synchronisation per call."""
    def guarded(data, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type != "cpu" and not isinstance(data, torch.Tensor):
            raise AssertionError(f"torch.{make.__name__}(host data, device={device}) in a sampling loop")
        return make(data, *args, device=device, **kwargs)
    return guarded


class NoBlockingHostToDeviceCopies(TorchDispatchMode):
    """Raises on a blocking copy of a host tensor onto a device (`.to(device)` without non_blocking=True)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            source, target = args[0].device, kwargs.get("device", args[0].device)
            if source.type == "cpu" and torch.device(target).type != "cpu" and not kwargs.get("non_blocking"):
                raise AssertionError(f"blocking host-to-device copy in a sampling loop: {func}")
        if func is torch.ops.aten.copy_.default:
            target, source = args[0].device, args[1].device
            if source.type == "cpu" and target.type != "cpu" and not (args[2:] and args[2]):
                raise AssertionError(f"blocking host-to-device copy in a sampling loop: {func}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", ["raster_eager", "var", "flexvar", "flowar_euler", "acdit_ddim"])
def test_training_loss_reads_nothing_on_the_host_and_copies_nothing_there(kind: str, monkeypatch) -> None:
    """After its first step (which moves the tokenizer and the noise tables once), a training loss and backward on
    the meta device: no read of device data and no blocking host-to-device copy, so a GPU step never stalls."""
    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: contextlib.nullcontext()
                        if device_type == "meta" else real_autocast(device_type, **kw))
    model, _ = make_sampler(kind)
    model = model.to("meta").train()
    tokens = bench.random_tokens(model.training_spec, 4, torch.device("meta"), torch.Generator().manual_seed(0))
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    model.loss(tokens, labels)["loss"].backward()
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, refuse_host_data(getattr(torch, name)))
    with NoBlockingHostToDeviceCopies():
        model.loss(tokens, labels)["loss"].backward()


# --- compiled training step ---------------------------------------------------------------------------------------


def build_for_training(kind: str):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
    if kind == "raster":  # class dropout 0.1 on: the graph draws random numbers too
        model = RasterGenerator(spec=GRID, num_classes=NUM_CLASSES, dim=32, depth=2, heads=2, token_dropout=0.0,
                                resid_dropout=0.0, ffn_dropout=0.0)
        with torch.no_grad():
            model.output.weight.normal_(std=0.5)
        return model, (torch.randint(0, 32, (4, 4, 4), generator=gen), labels)
    model = ACDiTGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=32, depth=1, heads=2, block_size=16,
                           attention="sdpa")  # random timesteps and noise inside the loss
    return model, (torch.randn(4, 4, 8, 8, generator=gen), labels)


def training_step_loss_and_grads(kind: str, compile: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model, batch = build_for_training(kind)
    task = GeneratorTask(generator=model, compile=compile)
    torch.manual_seed(2)  # the same random stream for both (dropout, timesteps, noise)
    loss = task.training_step(batch, 0)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.filterwarnings("ignore:.*self.trainer.*")  # training_step's self.log without a Trainer
def test_compile_switch_compiles_the_loss_once_and_never_pickles_it() -> None:
    model, _ = build_for_training("raster")
    assert GeneratorTask(generator=model).loss_fn() == model.loss  # off: the plain bound method
    task = GeneratorTask(generator=model, compile=True)
    fn = task.loss_fn()
    assert fn is task.loss_fn() and fn != model.loss  # built once, on first use
    assert task.__getstate__()["_compiled_loss"] is None  # spawned DDP ranks compile their own
    assert task.ema.module is not model and not any("_orig_mod" in k for k in task.state_dict())


@pytest.mark.slow  # ≈ 45 s of CPU compilation each (forward and backward graphs)
@pytest.mark.filterwarnings("ignore:.*self.trainer.*")
@pytest.mark.parametrize("kind", ["raster", "acdit"])
def test_compiled_training_step_gives_the_eager_loss_and_gradients(kind: str) -> None:
    """Inductor draws random numbers with its own generator unless `fallback_random`: set here so that both steps
    see the same dropout, timesteps and noise and the comparison is of the function, not of the random draws."""
    import torch._inductor.config
    eager_loss, eager_grads = training_step_loss_and_grads(kind, compile=False)
    with torch._inductor.config.patch(fallback_random=True):
        loss, grads = training_step_loss_and_grads(kind, compile=True)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
