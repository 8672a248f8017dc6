"""Training crops per epoch (data.crops) and the AR's input tokens (tokens=online | cached), on tiny settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader

import magvit2.train  # noqa: F401  (resolvers, sweeper/launcher config nodes)
from conftest import REPO, TINY
from magvit2 import config as C
from magvit2.errors import ConfigError
from magvit2.data import tokens as T
from magvit2.data.images import ImageFolder, PhotoCrops
from magvit2.data.sampler import GlobalBatchSampler
from magvit2.quantizers import split_indices
from magvit2.build import build_dataset, build_tokenizer
from magvit2.stages.ar import extract_tokens, token_cache, train_input

PHOTOS = ["astronaut", "coffee"]


def cfg_of(root, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", *TINY, "data.train_size=8", *overrides])


class OneProcess:  # the parts of an accelerate.Accelerator that token extraction uses
    is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

    def wait_for_everyone(self):
        pass


def tokenizer_of(cfg):
    torch.manual_seed(0)
    return build_tokenizer(cfg).eval().requires_grad_(False)


def test_sampler_keys_carry_the_epoch():
    s = GlobalBatchSampler(5, 4, seed=0)
    keys = [k for step in range(5) for k in s.global_batch(step)]  # 20 samples = 4 epochs of 5
    assert [e for e, _ in keys] == [i // 5 for i in range(20)]
    assert all(sorted(j for e, j in keys if e == ep) == list(range(5)) for ep in range(4))
    assert next(iter(GlobalBatchSampler(5, 4, seed=0, start_step=3))) == keys[12:16]  # resume: same keys


def test_photo_train_crops_change_every_epoch_unless_fixed():
    new = PhotoCrops(PHOTOS, 16, 64, 10, "train", seed=0)
    fixed = PhotoCrops(PHOTOS, 16, 64, 10, "train", seed=0, crops="fixed")
    assert all(torch.equal(fixed[(0, j)][0], fixed[(e, j)][0]) for j in range(10) for e in (1, 5))
    differ = [not torch.equal(new[(0, j)][0], new[(1, j)][0]) for j in range(10)]
    assert sum(differ) >= 8, differ  # (an equal crop by chance is possible, rarely)
    again = PhotoCrops(PHOTOS, 16, 64, 10, "train", seed=0)
    assert torch.equal(new[(3, 7)][0], again[(3, 7)][0]) and new[(3, 7)][1] == 1
    val = PhotoCrops(PHOTOS, 16, 64, 6, "val", seed=0)
    assert torch.equal(val[(0, 2)][0], val[(4, 2)][0]) and torch.equal(val[2][0], val[(4, 2)][0])


def test_imagefolder_train_crops_change_every_epoch_unless_fixed(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(tmp_path / split / "a" / f"{i}.png")
    new, fixed = ImageFolder(str(tmp_path), 16, "train"), ImageFolder(str(tmp_path), 16, "train", crops="fixed")
    assert sum(not torch.equal(new[(0, j)][0], new[(1, j)][0]) for j in range(4)) >= 3
    assert all(torch.equal(fixed[(0, j)][0], fixed[(2, j)][0]) for j in range(4))
    val = ImageFolder(str(tmp_path), 16, "val")
    assert torch.equal(val[(0, 1)][0], val[(3, 1)][0])
    with pytest.raises(ConfigError, match="data.crops='random'"):
        ImageFolder(str(tmp_path), 16, "train", crops="random")


def test_online_tokens_equal_a_cached_extraction_of_the_same_crops(tmp_path):
    online, cached = cfg_of(tmp_path), cfg_of(tmp_path, "tokens=cached", "tokens.crops=2", "tokens.flips=false")
    assert online.tokens.name == "online"
    tok = tokenizer_of(online)
    shards = T.TokenShards(extract_tokens(cached, tok, "tok", OneProcess()), "train", 2)
    assert shards.tokens.shape == (8, 2, 4, 4)
    assert not np.array_equal(shards.tokens[:, 0], shards.tokens[:, 1])  # the two crops give other tokens
    folder = extract_tokens(online, tok, "tok", OneProcess())
    assert not list(folder.glob("train-*")) and list(folder.glob("val-*"))  # online: val tokens only
    ds, to_tokens = train_input(online, tok, folder, "cpu")
    sampler = GlobalBatchSampler(len(ds), 4, seed=0)
    batches = iter(DataLoader(ds, batch_sampler=sampler))
    bits = list(online.factorization.bits)
    for step in range(4):  # 2 epochs of 8 images: crop c of the cache is the crop of epoch c
        x, y = next(batches)
        keys = sampler.global_batch(step)
        want = torch.from_numpy(np.stack([shards.tokens[j, e] for e, j in keys])).long()
        assert torch.equal(split_indices(to_tokens(x).flatten(1), bits), split_indices(want.flatten(1), bits))
        assert torch.equal(y, torch.stack([shards.labels[j] for _, j in keys]))


def test_cached_crops_and_flips_draw_a_variant_per_epoch(tmp_path):
    cfg = cfg_of(tmp_path, "tokens=cached", "tokens.crops=2", "tokens.flips=true")
    tok = tokenizer_of(cfg)
    folder = extract_tokens(cfg, tok, "tok", OneProcess())
    assert json.loads((folder / "done.json").read_text())["counts"] == {"train": 8 * 4, "val": 20}
    ds, to_tokens = train_input(cfg, tok, folder, "cpu")
    assert ds.tokens.shape == (8, 4, 4, 4) and len(ds) == 8
    img = build_dataset(cfg.data, "train", cfg.seed)
    x0, x1 = img[(0, 5)][0][None], img[(1, 5)][0][None]
    for v, x in enumerate([x0, x0.flip(3), x1, x1.flip(3)]):  # variant = crop * 2 + flip
        assert torch.equal(torch.from_numpy(np.array(ds.tokens[5, v])).long(), T.encode(tok, x)[0])
    draws = [ds.variant(e, 5) for e in range(12)]
    assert len(set(draws)) > 1 and draws == [T.TokenShards(folder, "train", 4, 0).variant(e, 5) for e in range(12)]
    assert all(torch.equal(ds[(e, 5)][0], torch.from_numpy(np.array(ds.tokens[5, d])).long()) for e, d in enumerate(draws))
    assert draws != [T.TokenShards(folder, "train", 4, 1).variant(e, 5) for e in range(12)]  # seed matters


def test_tokens_and_crops_settings_enter_signatures_and_cache_keys(tmp_path):
    online, cached = cfg_of(tmp_path), cfg_of(tmp_path, "tokens=cached")
    assert (cached.tokens.crops, cached.tokens.flips) == (5, True)
    ar = {C.ar_signature(c) for c in (online, cached, cfg_of(tmp_path, "tokens=cached", "tokens.crops=1"),
                                      cfg_of(tmp_path, "tokens=cached", "tokens.flips=false"))}
    assert len(ar) == 4
    keys = {token_cache(c, "tok") for c in (online, cached, cfg_of(tmp_path, "tokens=cached", "tokens.crops=1"),
                                            cfg_of(tmp_path, "tokens=cached", "tokens.flips=false"))}
    assert len(keys) == 4
    fixed = cfg_of(tmp_path, "data.crops=fixed")
    assert online.data.crops == "per_epoch" and C.tokenizer_signature(fixed) != C.tokenizer_signature(online)
    assert C.ar_signature(fixed) != C.ar_signature(online)
    with pytest.raises(ConfigError, match="identical crops"):
        C.tokens_settings(cfg_of(tmp_path, "data.crops=fixed", "tokens=cached"))
    assert C.tokens_settings(cfg_of(tmp_path, "data.crops=fixed", "tokens=cached", "tokens.crops=1",
                               "tokens.flips=false")) == {"name": "cached", "crops": 1, "flips": False}


def test_token_cache_is_memory_mapped_and_an_old_cache_is_consolidated_once(tmp_path):
    """Shards from any ranks in any order become one memory-mapped <split>-tokens.npy (the ranks of a node share its
    page cache); a cache from before (shards only) is consolidated on first use; a damaged shard is named."""
    rng = np.random.default_rng(0)
    n, V = 10, 2
    tokens, labels = rng.integers(0, 2**18, (n * V, 4, 4), dtype=np.int32), np.repeat(np.arange(n) % 3, V)
    order = rng.permutation(n * V)  # rank-interleaved shards arrive out of order
    for k, part in enumerate(np.array_split(order, 3)):
        np.savez(tmp_path / f"train-r{k % 2}-{k:05d}.npz", index=part, tokens=tokens[part], labels=labels[part])
    ds = T.TokenShards(tmp_path, "train", V)
    assert isinstance(ds.tokens, np.memmap) and (tmp_path / "train-tokens.npy").exists()
    assert np.array_equal(np.asarray(ds.tokens).reshape(n * V, 4, 4), tokens) and torch.equal(
        ds.labels, torch.from_numpy(labels[::V]))
    assert torch.equal(ds[3][0], torch.from_numpy(tokens[3 * V]).long())
    (tmp_path / "val-r0-00000.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match=r"token cache shard .*val-r0-00000.npz is damaged.*delete its folder"):
        T.TokenShards(tmp_path, "val")
