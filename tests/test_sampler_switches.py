"""The speed settings sampling.cache / sampling.compile and trainer.ar.activation_checkpointing: the same math as
the defaults (same draws, same gradients), no change to run signatures, wired through training, `python -m
magvit2.sample` and `python -m magvit2.evaluate ar`, and a one-line error for a bad value. The training run here
also has an Inception file and metrics.precision_recall=true: the in-loop FID / IS / precision / recall path."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import _checked, _train_env, run_train, train_cmd
from test_build import cfg_of
from test_speed_modes import tiny

from magvit2 import config as C
from magvit2.errors import ConfigError
from magvit2.evaluate.__main__ import main as evaluate
from magvit2.models.ar import ARConfig, FactorizedAR, subtoken_loss
from magvit2.sample import main as sample
from magvit2.stages.generate import sample_images, sampler


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second thread only adds sync overhead, many times the work when other processes share the CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPEED = ["sampling.cache=static", "sampling.cache=none", "sampling.compile=true",
         "trainer.ar.activation_checkpointing=true"]


def test_speed_settings_leave_signatures_alone():
    base = cfg_of()
    assert (base.sampling.cache, base.sampling.compile, base.trainer.ar.activation_checkpointing) == \
        ("dynamic", False, False)  # the defaults: today's sampler and training forward
    sigs = {(C.tokenizer_signature(c), C.ar_signature(c)) for c in [base] + [cfg_of(o) for o in SPEED]}
    assert len(sigs) == 1
    old = cfg_of()  # a config from before the settings: its run dir is found again
    with open_dict(old):
        del old.sampling.cache, old.sampling.compile, old.trainer.ar.activation_checkpointing
    assert C.ar_signature(old) == C.ar_signature(base)
    # only these two keys leave the sampling entry; every other sampling key still makes its own run
    assert set(C.to_dict(base.sampling)) - set(C.identity._strip(C.to_dict(base.sampling))) == {"cache", "compile"}
    for name in ("B", "L", "XL", "tiny", "stand_XL"):  # conf/sampling and experiments/sampling
        s = cfg_of(f"model={name}").sampling
        assert (s.cache, s.compile) == ("dynamic", False), name


class Decoder:
    """sample_images' tokenizer: the token grid as an image, so equal images are equal tokens."""

    def decode_indices(self, idx):
        return (idx.double() / 256)[:, None].expand(-1, 3, -1, -1)


def settings(**kw):
    return OmegaConf.create({"cfg_scale": [1.5, 2.5], "temperature": 1.0, "top_k": 6, "top_p": 0.9, **kw})


def test_every_cache_draws_the_same_images_through_sample_images(monkeypatch):
    m, labels = tiny(), torch.tensor([0, 3, 10])
    seen, generate = [], m.generate
    monkeypatch.setattr(m, "generate", lambda *a, **k: seen.append(k["use_cache"]) or generate(*a, **k))
    for seeds in ([11, 12, 13], None):  # per-sample streams, and one stream per batch
        out = {c: sample_images(m, Decoder(), labels, settings(cache=c), 4, 2, "cpu", False, seeds)
               for c in ("dynamic", "static", "none")}
        assert out["dynamic"].shape == (3, 3, 4, 4) and out["dynamic"].unique().numel() > 3
        assert torch.equal(out["static"], out["dynamic"]) and torch.equal(out["none"], out["dynamic"])
    assert seen == [True, True, "static", "static", False, False] * 2  # two batches each
    # compile=true compiles once per model (inductor's own equality: test_speed_modes' slow tests)
    calls = []
    monkeypatch.setattr(m, "compile_sampling", lambda cuda_graphs: calls.append(cuda_graphs) or setattr(
        m, "_compiled", (m._inter_step, m._intra)))
    for _ in range(2):
        got = sample_images(m, Decoder(), labels, settings(cache="static", compile=True), 4, 2, "cpu", False)
        assert torch.equal(got, out["dynamic"])
    assert calls == [False]


@pytest.mark.parametrize("kw,needle", [
    ({"cache": "always"}, "sampling.cache='always' (--cache): use dynamic"),
    ({"compile": 1}, "sampling.compile=1 (--compile): use false | true | cuda_graphs"),
    ({"compile": True}, "set sampling.cache=static (--cache static) too"),
    ({"cache": "static", "compile": "cuda_graphs"}, "sampling.compile=cuda_graphs (--compile cuda_graphs) needs a "
                                                    "CUDA device, this one is cpu"),
])
def test_bad_sampler_settings_name_the_setting(kw, needle):
    with pytest.raises(ConfigError) as e:
        sampler(settings(**kw), "cpu")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert sampler(settings(), "cpu") == (True, False)  # absent (a run from before the settings): the defaults



@pytest.mark.parametrize("override,needle", [
    ("sampling.cache=always", "sampling.cache='always' (--cache): use dynamic"),
    ("sampling.compile=true", "set sampling.cache=static (--cache static) too"),
    ("trainer.ar.activation_checkpointing=yes", "trainer.ar.activation_checkpointing='yes': use true"),
])
def test_bad_speed_settings_fail_validation_before_launch(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        C.validate(cfg_of(override))
    C.validate(cfg_of("sampling.cache=static", "sampling.compile=cuda_graphs"))  # the GPU is checked where it samples


def test_activation_checkpointing_gives_the_plain_gradients_with_dropout():
    torch.manual_seed(0)
    m = FactorizedAR(ARConfig(bits=(3, 5), dim=64, n_inter=2, n_intra=1, n_heads=4, grid=4, num_classes=10,
                              attn_dropout=0.1, intra_embed_dropout=True)).train()  # every dropout on
    for h in m.heads:
        torch.nn.init.normal_(h.weight, 0.0, 0.02)
    sub = torch.stack([torch.randint(0, v, (3, 16)) for v in m.cfg.vocab_sizes], -1)
    y = torch.tensor([1, 2, 3])

    def step(fwd, ckpt: bool, seed: int = 7):
        m.activation_checkpointing = ckpt
        m.zero_grad()
        torch.manual_seed(seed)
        loss, _ = subtoken_loss(fwd(sub, y), sub)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in m.parameters()] + [torch.rand(3)]  # + the RNG after

    plain = step(m, False)
    assert step(m, False, seed=3)[0] != plain[0]  # the dropout draws matter: other masks, another loss
    for got in (step(m, True), step(torch.compile(m, backend="aot_eager"), True)):
        assert all(torch.equal(a, b) for a, b in zip(got, plain))  # bit for bit: recompute redraws the same masks


# a training run with both switches on: a wrapped checkpoint() counts the blocks it recomputes
COUNTED = ("import atexit, sys\n"
           "import magvit2.models.ar as A\n"
           "n, real = [0], A.checkpoint\n"
           "def counted(*a, **k):\n"
           "    n[0] += 1\n"
           "    return real(*a, **k)\n"
           "A.checkpoint = counted\n"
           "atexit.register(lambda: print(f'checkpointed blocks: {n[0]}', file=sys.stderr))\n"
           "sys.argv = ['magvit2.train', *sys.argv[1:]]\n"
           "from magvit2.train import cli\n"
           "cli()")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from weights import make_inception_weights
    root = tmp_path_factory.mktemp("switches")
    # a random-weight Inception file: the in-loop FID / IS / precision / recall code runs (numbers of no meaning)
    inception = make_inception_weights(root / "inception.pth")
    args = train_cmd(root, "trainer.ar.activation_checkpointing=true", "sampling.cache=static",
                     f"metrics.inception_weights={inception}", "metrics.precision_recall=true")[3:]
    p = _checked(subprocess.run([sys.executable, "-c", COUNTED, *args], cwd=root, env=_train_env(None),
                                capture_output=True, text=True, timeout=600), True)
    assert "checkpointed blocks: 18" in p.stderr  # 6 steps x (2 inter + 1 intra); none in val loss or sampling
    return root, next((root / "runs" / "ar").glob("*/checkpoint.pt")).parent


@pytest.mark.slow  # a tiny tokenizer + AR run
def test_training_run_with_the_switches_logs_sampling_throughput(run):
    root, rd = run
    res = json.loads((rd / "results.json").read_text())
    assert res["compute/sample_images_per_s"] > 0 and res["eval/n_samples"] == 8
    # the in-loop evaluation with an Inception file (random weights: only that the numbers exist and are in range)
    assert np.isfinite(res["eval/fid"]) and res["eval/n_real"] == res["eval/n_real_features"] == 20
    assert all(0 <= res[f"eval/{k}"] <= 1 for k in ("precision", "recall"))
    # sampling.compile=cuda_graphs on a CPU machine: one line naming the setting before the AR trains
    p = run_train(root, "sampling.cache=static", "sampling.compile=cuda_graphs", "trainer.ar.steps=7", check=False)
    assert p.returncode == 2 and "error: sampling.compile=cuda_graphs" in p.stderr, p.stderr[-2000:]
    assert "AR k6_12" not in p.stderr and [d for d in (root / "runs" / "ar").iterdir() if d.is_dir()] == [rd]


@pytest.mark.slow
def test_sample_and_evaluate_take_cache_and_compile(run, tmp_path, capsys):
    _, rd = run
    common = ["--per-class", "2", "--seed", "3"]
    for cache in ("static", "dynamic"):  # magvit2.sample's main: `python -m magvit2.sample` less the start-up
        assert sample([str(rd), *common, "--cache", cache, "--out", str(tmp_path / cache)]) == 0
    capsys.readouterr()
    assert sample([str(rd), "--compile", "cuda_graphs", "--cache", "static"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "needs a CUDA device" in err[0], err
    with pytest.raises(SystemExit) as e:  # argparse's choices (config.SAMPLER_CACHE): before anything loads
        sample([str(rd), "--cache", "full"])
    assert e.value.code == 2 and "--cache: invalid choice: 'full' (choose from 'dynamic', 'static', 'none')" in \
        capsys.readouterr().err
    ev = ["ar", str(rd), "--per-class", "1", "--workers", "0", "--no-download", "--root", str(tmp_path)]
    assert evaluate(ev + ["--compile", "cuda_graphs", "--cache", "static"]) == 2
    assert "error: sampling.compile=cuda_graphs" in capsys.readouterr().err
    assert evaluate(ev + ["--cache", "static", "--out", str(tmp_path / "ev")]) == 0
    assert np.load(tmp_path / "ev" / "samples.npz")["arr_0"].shape == (4, 16, 16, 3)
    with np.load(tmp_path / "static" / "samples.npz") as a, np.load(tmp_path / "dynamic" / "samples.npz") as b:
        assert a["arr_0"].shape == (8, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])
