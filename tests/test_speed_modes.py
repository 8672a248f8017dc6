"""Speed paths compute what the plain ones do: the static-cache sampler (plain, compiled), the compiled AR step, the
guarded CUDA-graph path, and the trainer's compile / fused switches (which leave run signatures alone)."""
import pytest
import torch

from conftest import run_train
from test_build import cfg_of

from magvit2 import config as C
from magvit2.bench import ar_sample, ar_train
from magvit2.bench.common import compile_unavailable
from magvit2.models.ar import ARConfig, FactorizedAR
from magvit2.models.llama import KVCache
from magvit2.stages.tokenizer import fused

NO_COMPILER = compile_unavailable(torch.device("cpu"))
needs_compiler = pytest.mark.skipif(NO_COMPILER is not None, reason=NO_COMPILER or "")


def tiny(bits=(3, 5), n_intra=1, dtype=torch.float64) -> FactorizedAR:
    torch.manual_seed(0)
    m = FactorizedAR(ARConfig(bits=bits, dim=64, n_inter=2, n_intra=n_intra, n_heads=4, grid=4, num_classes=10,
                              class_dropout=0.0, embed_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)).to(dtype)
    for h in m.heads:
        torch.nn.init.normal_(h.weight, 0.0, 0.5)
    return m.eval()


def draws(m, use_cache, seed=5):
    labels = torch.tensor([0, 3, 9, 10])
    return m.generate(labels, cfg_scale=[1.5, 2.5, 3.0][:m.num_subtokens], top_k=6, top_p=0.9,
                      generator=torch.Generator().manual_seed(seed), use_cache=use_cache)


@pytest.mark.parametrize("bits,n_intra", [((3, 5), 1), ((2, 3, 3), 0)])
def test_static_cache_sampler_equals_plain_loop(bits, n_intra):
    m = tiny(bits, n_intra)
    assert torch.equal(draws(m, "static"), draws(m, False))


def test_static_cache_follows_autocast_dtype_and_refuses_bad_use():
    m = tiny(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m._caches(2, torch.device("cpu"))[0].k.dtype == torch.bfloat16
        out = draws(m, "static")
    assert out.shape == (4, 16, 2) and (out[..., 1] < 32).all()
    with pytest.raises(ValueError, match="use_cache"):
        draws(m, "always")
    c = KVCache(1, 4, 16, 16)
    c.allocate(torch.float32)
    with pytest.raises(ValueError, match="one position at a time"):
        m.inter[0].attention(torch.randn(1, 2, 64), None, c, torch.tensor(3))


def test_cuda_graph_path_is_guarded_without_cuda():
    m = tiny()
    with pytest.raises(RuntimeError, match="CUDA device"):
        m.compile_sampling(cuda_graphs=True)
    assert m._compiled is None  # nothing half set up
    skip = {name: why for name, _, why in ar_sample.variants(torch.device("cpu"), compile_on=True)}
    assert "CUDA" in skip["static + CUDA graphs"] and skip["plain loop"] is None


def test_fused_adam_only_on_cuda_and_speed_switches_keep_signatures():
    assert fused({"fused_adam": True}, torch.device("cpu")) == {}
    assert fused({"fused_adam": True}, torch.device("cuda")) == {"fused": True}
    assert fused({"fused_adam": False}, torch.device("cuda")) == {}
    base = cfg_of()
    assert base.trainer.ar.compile is False and base.trainer.tokenizer.fused_adam is True
    for o in ("trainer.ar.compile=true", "trainer.tokenizer.compile=true", "trainer.ar.fused_adam=false"):
        alt = cfg_of(o)
        assert (C.tokenizer_signature(alt), C.ar_signature(alt)) == (C.tokenizer_signature(base),
                                                                     C.ar_signature(base))


@pytest.mark.slow
@needs_compiler
def test_compiled_ar_step_equals_eager():
    # the smallest model with every part (inter + intra blocks, 2D RoPE, two heads): inductor's compile time grows
    # with the graph, and the equality does not need depth
    m = tiny(dtype=torch.float32)
    for h in m.heads:
        torch.nn.init.normal_(h.weight, 0.0, 0.02)
    sub = torch.stack([torch.randint(0, v, (2, 16)) for v in m.cfg.vocab_sizes], -1)
    y = torch.tensor([1, 2])
    grads = []
    for fwd in (m, torch.compile(m)):
        m.zero_grad()
        loss, _ = ar_train.subtoken_loss(fwd(sub, y), sub)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@needs_compiler
def test_compiled_static_sampler_equals_plain_loop():
    m = tiny()
    m.compile_sampling()
    assert torch.equal(draws(m, "static"), draws(m, False))


@pytest.mark.slow
@needs_compiler
def test_ar_run_with_compile_trains_and_saves_plain_names(tmp_path):
    # aot_eager: the training loop's compile wiring (capture, prepare, plain checkpoint names) without inductor's
    # minutes of C++ codegen on CPU; that the inductor step equals eager is test_compiled_ar_step_equals_eager's
    run_train(tmp_path, "trainer.ar.compile=aot_eager", "trainer.ar.ckpt_every=3", "sampling.per_class=1",
              timeout=900)
    ckpts = list((tmp_path / "runs" / "ar").glob("*/checkpoint.pt"))
    assert len(ckpts) == 1
    model = torch.load(ckpts[0], map_location="cpu", weights_only=False)["model"]
    assert model and not any("_orig_mod." in k or k.startswith("module.") for k in model)
