"""The typed config: every group option and experiment composes and validates; every choice-like setting refuses a
typo at plan time, in one line naming the setting and its allowed values, before anything exists under paths.root.
And run dirs written before this schema (tests/fixtures/old_runs) keep their signatures and are found finished."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import magvit2.train  # noqa: F401  (resolvers, the experiments search path, sweeper/launcher config nodes)
from conftest import REPO, run_train
from magvit2 import config as C
from magvit2.config.schema import CHOICES
from magvit2.errors import ConfigError
from magvit2.runs import RunDir

GROUPS = ("data", "factorization", "model", "quantizer", "sampling", "tokenizer", "tokens", "trainer")
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments" / "experiment").glob("*.yaml"))
OLD_RUNS = Path(__file__).parent / "fixtures" / "old_runs"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    (root / "train" / "cls").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "train" / "cls" / "0.png")
    return root


def cfg_of(root, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", *overrides], return_hydra_config=True)


def options(group: str) -> list[str]:
    files = list((REPO / "conf" / group).glob("*.yaml")) + list((REPO / "experiments" / group).glob("*.yaml"))
    return sorted({p.stem for p in files})


def leaves(node, prefix=""):
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from leaves(v, key + ".")
        else:
            yield key, v


def check(cfg) -> None:
    """validate, and every bool setting is a choice of the schema (a new flag gets a row in CHOICES)."""
    C.validate(cfg)
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
             for k in cfg if k != "hydra"}
    flags = {k for k, v in leaves(plain) if isinstance(v, bool)}
    assert flags <= set(CHOICES), sorted(flags - set(CHOICES))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_validates(group, images, tmp_path):
    for name in options(group):
        extra = [f"path={images}"] if group == "data" else []
        for stage in ("ar", "tokenizer"):
            check(cfg_of(tmp_path, f"stage={stage}", f"{group}={name}", *extra))
    assert not any(tmp_path.iterdir())


def _arms(cfg) -> list[str]:
    """One override per value of each axis the experiment sweeps (hydra.sweeper.params)."""
    params = cfg.hydra.sweeper.get("params") or {}
    return [f"{k}={v.strip()}" for k, vals in params.items() for v in str(vals).split(",")]


@pytest.mark.parametrize("scale", ["full", "tiny"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_and_arm_composes_and_validates(experiment, scale, tmp_path):
    base = [f"+experiment={experiment}", f"scale={scale}"]
    cfg = cfg_of(tmp_path, *base)
    check(cfg)
    for arm in _arms(cfg):  # (cross_dataset sweeps nothing: one tokenizer)
        check(cfg_of(tmp_path, *base, arm))
    assert not any(tmp_path.iterdir())


# the group choices a setting needs to exist (quantizer.distance is VQ's, data.resize an image folder's)
NEEDS = {"quantizer.distance": ["quantizer=vq_plain"], "quantizer.restart_dead": ["quantizer=vq"],
         "quantizer.codebook_entropy": ["quantizer=lfq"], "tokens.flips": ["tokens=cached"]}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_refuses_a_typo_in_one_line_naming_its_values(key, images, tmp_path):
    extra = NEEDS.get(key, []) + (["data=imagefolder", f"path={images}"] if key.startswith("data.") else [])
    cfg = cfg_of(tmp_path, *extra)
    assert OmegaConf.select(cfg, key, default="absent") != "absent", f"{key} is in no composed config"
    for typo in ("typo", "1"):  # a wrong word, and a wrong type (1 is neither true nor a word)
        with pytest.raises(ConfigError) as e:
            C.validate(cfg_of(tmp_path, *extra, f"{key}={typo}"))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{key}={typo if typo == '1' else repr(typo)}"), msg
        words = [str(v).lower() if isinstance(v, bool) else str(v) for v in CHOICES[key].values]
        assert all(f" {w} (" in msg for w in words), msg
    assert not any(tmp_path.iterdir())  # nothing created: no run dir, lock, cache or MLflow store


@pytest.mark.parametrize("args,multirun,needle", [
    (["tokens.weights=emaa"], False, "error: tokens.weights='emaa': use raw ("),  # trained a tokenizer first
    (["model.class_rope=zeros,identity"], True, "model.class_rope='zeros': use zero ("),  # had its own signature
])
def test_typos_fail_the_dry_run_before_anything_exists(args, multirun, needle, tmp_path):
    p = run_train(tmp_path, *args, "dry_run=true", multirun=multirun, check=False, tiny=False, timeout=300)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not {"runs", "cache", "mlflow.db", "sweeps"} & {c.name for c in tmp_path.iterdir()}


def test_quantizer_reports_its_group_name_not_its_class(tmp_path):
    names = {q: cfg_of(tmp_path, "stage=tokenizer", f"quantizer={q}") for q in ("lfq", "vq", "vq_plain")}
    assert {q: C.choices(c)["quantizer"] for q, c in names.items()} == {q: q for q in names}
    assert C.member_name(names["vq_plain"]) == "tiny-vq_plain" != C.member_name(names["vq"])


def _manifest() -> list[dict]:
    return json.loads((OLD_RUNS / "runs.json").read_text())


@pytest.mark.parametrize("run", _manifest(), ids=lambda r: "-".join(r["overrides"]))
def test_run_dirs_from_before_the_schema_keep_their_signature_and_are_found_finished(run, tmp_path):
    """tests/fixtures/old_runs: run dirs as magvit2 at f06b0a2 wrote them (RunDir.write_config / write_status of
    the composed config with paths.root=/old/outputs; its runs.json: their overrides, signatures and names)."""
    shutil.copytree(OLD_RUNS, tmp_path / "runs")
    stored = tmp_path / "runs" / run["stage"] / run["signature"]
    cfg = cfg_of(tmp_path, *run["overrides"])
    assert C.signature(cfg) == run["signature"]  # today's composition: the same signature
    assert RunDir(C.run_dir(cfg)).path == stored and RunDir.find(tmp_path / "runs", run["stage"], run["signature"])
    from magvit2.sweep.state import describe_member
    assert describe_member(cfg, list(run["overrides"]))["state"] == "finished"
    old = C.load(stored)  # the stored config, migrated: still its signature, and today's names
    assert C.signature(old) == run["signature"] and "name" not in OmegaConf.load(stored / "config.yaml").quantizer
    assert C.choices(old) == C.choices(cfg) == {**run["choices"], "quantizer": cfg.quantizer.name}


def test_the_migration_fills_old_values_and_keeps_todays(tmp_path):
    old = OmegaConf.create({"seed": 3, "tokenizer": {"name": "t", "checkpoint": "/x.pt"},
                            "quantizer": {"_target_": "magvit2.quantizers.VQ", "distance": "euclidean"},
                            "model": {"name": "m"}, "data": {"name": "imagefolder", "path": "/d"},
                            "metrics": {"download": True}})
    m = C.migrate(old)
    assert m.metrics.protocol == "precise"  # what its in-loop evaluation computed
    assert (m.model.class_rope, m.model.intra_embed_dropout, m.tokenizer.adagn_variance,
            m.tokenizer.adagn_scale_init, m.data.resize, m.data.crops) == ("identity", True, "population", "one",
                                                                          "bicubic", "per_epoch")
    assert dict(m.tokens) == {"name": "online", "tokenizer": "/x.pt", "weights": "raw", "seed": 3}
    assert m.quantizer.name == "vq_plain"
    now = cfg_of(tmp_path)
    assert C.migrate(now.copy()) == now  # nothing to fill in today's config


def test_debug_quick_shortens_any_run_and_gets_its_own_signature(tmp_path):
    plain, quick = cfg_of(tmp_path), cfg_of(tmp_path, "debug=quick")
    assert (quick.trainer.tokenizer.steps, quick.trainer.ar.steps) == (6, 6)
    assert (quick.data.val_size, quick.sampling.per_class, quick.tracking.log_every) == (8, 1, 1)
    assert plain.trainer.ar.steps == 200 and C.signature(quick) != C.signature(plain)


@pytest.mark.slow  # the embedded default, cut by debug=quick: both stages, evaluation, samples (~1 min)
def test_debug_quick_runs_the_embedded_default(tmp_path):
    p = run_train(tmp_path, "debug=quick", tiny=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    statuses = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/*/status.json")]
    assert sorted(s["state"] for s in statuses) == ["finished", "finished"]
    assert {s["step"] for s in statuses} == {6}
