"""Every shell command in README.md's ```bash blocks, run as written, in README order, in a fresh cwd (no paths.root,
no MAGVIT2_ROOT), against the local SLURM (.ci/slurm.sh) and an MLflow server started by the README's own command.

Only the substitutions of SUBST (each must still match the README) and, for commands that would train for more than
~30 s, the sizes of SIZES appended; `python` and `mlflow` are the venv's (its bin/ first on PATH); `<signature>` and
`<sweep id>` are filled from the output of the commands before them. A command that fails fails the test."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY
from mlflow_server import empty_store, free_port
from test_slurm_cluster import slurm_cluster  # noqa: F401  (starts the cluster)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SETUP = ["bash .ci/setup && .venv/bin/python -m magvit2.train",
         "bash .ci/setup --test && .venv/bin/python -m pytest"]  # CI runs these itself: checked, not run
PORT = free_port()
# (README text, what the test runs instead, why). Each must occur in the README.
SUBST = [
    ("-m factorization=k6_12,k9_9 model=B,L,XL trainer=", "-m factorization=k6_12,k9_9 model=tiny trainer=",
     "AR-B/L/XL do not train on 2 CPUs (the dry-run command keeps B,L,XL)"),
    ("-m factorization=k6_12,k9_9 model=B,L,XL\n", "-m factorization=k6_12,k9_9 model=tiny\n", "same"),
    ("path=/data/imagenet", "path={images}", "a 4-class ImageNet-layout folder cut from the embedded photos"),
    ("hydra.launcher.partition=gpu", "hydra.launcher.partition=debug", "the local cluster's partition"),
    ("hydra.launcher.gpus_per_node=8", "hydra.launcher.gpus_per_node=0", "no GPUs"),
    ("hydra.launcher.tasks_per_node=8", "hydra.launcher.tasks_per_node=1", "one CPU task per member"),
    ("--data /data/imagenet/val", "--data {images}/val", "ImageNet val: the same folder's 4 val images"),
    ("--nproc_per_node 8", "--nproc_per_node 2", "2 CPU processes split the sampling"),
    (":5000", f":{PORT}", "a free port for the MLflow server"),
    ("--port 5000", f"--port {PORT}", "same"),
]
# Sizes appended to commands that train (TINY: tests/conftest.py); the photo-data keys only with data=photos.
PHOTO_KEYS = ("data.scale=", "data.train_size=", "data.photos=")
FOLDER = [o for o in TINY if not o.startswith(PHOTO_KEYS)] + ["data.val_size=4", "data.num_workers=0"]
SIZES = [  # (regex a whole command must match, sizes appended; the first match)
    # the ablations: composed and validated member by member here (tests/test_experiments.py trains every experiment
    # at scale=tiny, cut to 6 steps; the full scale needs ImageNet and GPUs)
    (r"python -m magvit2\.train -m \+experiment=.*", ["dry_run=true"]),
    (r"python -m magvit2\.train", TINY),  # the embedded default: ~15 min on 2 CPUs as shipped
    (r"python -m magvit2\.train stage=tokenizer quantizer=vq", TINY),
    (r"python -m magvit2\.train -m factorization=k6_12,k9_9 model=tiny", TINY),
    (r".* tokenizer=magvit2_256_L trainer=imagenet stage=tokenizer", FOLDER + [  # the 256-L at 16 px, 6 steps
        "tokenizer.num_res_blocks=1", "tokenizer.loss.disc_layers=2"]),
    (r".* hydra/launcher=slurm .*", FOLDER),  # trainer=imagenet: 300 epochs
    (r"python -m magvit2\.evaluate tokenizer .*", ["--workers", "0", "--no-download"]),
    # the stand-in AR files are no paper size, so no conf/sampling/<size>.yaml: the scales are given
    (r"torchrun .* -m magvit2\.evaluate ar .*", ["--per-class", "1", "--cfg-scale", "1.5", "--temperature", "1.0",
                                                "--workers", "0", "--no-download"]),
]

# (regex a dry-run command matches, the members it must list; the first match)
DRY_RUNS = [
    (r".* model=B,L,XL dry_run=true", 6),  # 2 splits x B,L,XL
    (r".*\+experiment=factorization scale=tiny seed=0,1,2\b.*", 9),  # tiny: 3 splits x 3 seeds
    (r".*\+experiment=factorization seed=0,1,2\b.*", 21),  # full: 7 splits x 3 seeds
]


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments dropped (a trailing `  # ...` too)."""
    cmds = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        block = re.sub(r"\\\n\s*", "", block)
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def _images(root: Path) -> Path:
    """<root>/train/<photo>/*.png and val/<photo>/*.png: 4 classes, shifted crops of 4 embedded photos."""
    from skimage import data
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        im.thumbnail((64, 64))
        for split, n in (("train", 4), ("val", 1)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                x = int(rng.integers(0, 8))
                im.crop((x, 0, im.width - 8 + x, im.height)).save(root / split / name / f"{i}.png")
    return root


def _released_ckpts(folder: Path) -> None:
    """Stand-ins for the released files in the original's layout, tiny and with random weights (never a real
    number): the 256-L / 128-L tokenizers, and AR files carrying a tokenizer with 16x16 tokens at 256 px."""
    import torch

    from magvit2 import released
    from magvit2.models.ar import ARConfig, FactorizedAR
    from magvit2.models.tokenizer import Tokenizer
    from magvit2.quantizers import LFQ
    folder.mkdir()
    torch.manual_seed(0)
    tok = Tokenizer(LFQ(bits=18), ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, resolution=256)
    tok_sd = released.export_tokenizer(tok.state_dict(), 5, tok.state_dict())
    for name in ("imagenet_256_L", "imagenet_128_L"):
        released.files.write(folder / f"{name}.ckpt", tok_sd)
    for size in ("B", "L", "XL"):
        ar = FactorizedAR(ARConfig(bits=(6, 12), dim=64, n_inter=2, n_intra=1, n_heads=1, num_classes=4, grid=16))
        released.files.write(folder / f"AR_256_{size}.ckpt", released.export_ar(ar.state_dict(), ar.cfg, tok.state_dict(), 5))
    np.savez(folder / "VIRTUAL_imagenet256_labeled.npz",
             arr_0=np.random.default_rng(0).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))


def _health(port: int, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the README's mlflow server is not up on port {port} after {timeout} s")


def test_readme_setup_commands_are_the_first_block():
    assert readme_commands((REPO / "README.md").read_text())[:2] == SETUP
    assert (REPO / ".ci" / "setup").is_file()


def test_every_readme_command_works_as_written(tmp_path):
    text = (REPO / "README.md").read_text()
    cwd = tmp_path / "work"
    cwd.mkdir()
    images = _images(tmp_path / "imagenet")
    _released_ckpts(cwd / "ckpts")
    for old, new, _ in SUBST:
        assert old in text, f"SUBST entry {old!r} no longer matches the README: update the table"
        text = text.replace(old, new.format(images=images))
    cmds = readme_commands(text)
    assert cmds[:2] == SETUP
    cmds = cmds[2:]
    for pattern, _ in SIZES + DRY_RUNS:
        assert any(re.fullmatch(pattern, c) for c in cmds), f"SIZES/DRY_RUNS entry {pattern!r} matches no command"

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MAGVIT2_ROOT")}
    env["MAGVIT2_POLL_S"] = "3"  # `status --wait` polls every 3 s instead of 30 (the command stays verbatim)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="2")
    # the sqlite store the commands create (and the README's server serves), pre-migrated: saves ~10 s per creation
    (cwd / "outputs").mkdir()
    (cwd / "outputs" / "mlflow.db").write_bytes(empty_store().read_bytes())
    fill: dict[str, str] = {}
    server = None
    times = []
    try:
        for cmd in cmds:
            for k, v in fill.items():
                cmd = cmd.replace(k, v)
            assert not re.search(r"<[a-z ]+>", cmd), f"unfilled placeholder in {cmd!r}"
            sizes = next((v for k, v in SIZES if re.fullmatch(k, cmd)), [])
            if sizes:
                cmd = cmd + " " + " ".join(shlex.quote(o) for o in sizes)
            t0 = time.monotonic()
            if cmd.endswith("&"):  # the MLflow server: in the background, as the README starts it
                assert cmd.startswith("mlflow server"), cmd
                server = subprocess.Popen(["bash", "-c", cmd[:-1]], cwd=cwd, env=env, start_new_session=True,
                                          stdout=open(tmp_path / "mlflow.log", "wb"), stderr=subprocess.STDOUT)
                _health(PORT, 90)
            elif cmd.startswith("export "):
                name = cmd.split()[1].split("=")[0]
                p = subprocess.run(["bash", "-c", f'{cmd} && printf %s "${name}"'], cwd=cwd, env=env,
                                   capture_output=True, text=True, check=True)
                env[name] = p.stdout
            else:
                p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                                   timeout=600)
                out = p.stdout + p.stderr
                assert p.returncode == 0, f"README command failed ({p.returncode}): {cmd}\n{out[-4000:]}"
                _check(cmd, out, cwd, fill, env)
            times.append((round(time.monotonic() - t0, 1), cmd[:100]))
    finally:
        print("\n".join(f"{t:6.1f} s  {c}" for t, c in times))
        if server is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(server.pid, sig)
                    server.wait(15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
    assert "<sweep id>" in fill and "<signature>" in fill


def _check(cmd: str, out: str, cwd: Path, fill: dict, env: dict) -> None:
    """What each command must have done, beyond exiting 0; fills the placeholders of later commands."""
    args = cmd.split("python -m magvit2.train", 1)[1] if cmd.startswith("python -m magvit2.train") else None
    if args is not None and not re.search(r"--cfg|dry_run|(^| )-m ", args):  # a single run: ends in its summary
        assert "== magvit2 " in out and " run: " + str(cwd / "outputs" / "runs") in out, out[-3000:]
        if "<signature>" not in fill and "stage=" not in cmd:
            fill["<signature>"] = re.search(r"== magvit2 ar run: \S+/outputs/runs/ar/(\w+)", out).group(1)
    if cmd.startswith("python -m magvit2.evaluate tokenizer"):
        assert "rFID" in out and "4 images" in out, out[-2000:]
    if " -m magvit2.evaluate ar " in cmd:
        name = re.search(r"ckpts/(\S+)\.ckpt", cmd).group(1)
        with np.load(next((cwd / "outputs" / "evaluate" / "ar").glob(f"{name}-*/samples.npz"))) as z:
            assert z["arr_0"].shape == (4, 256, 256, 3), out[-2000:]
    if cmd.startswith("python -m magvit2.convert"):
        assert "AR model (Net2NetTransformer)" in out and (cwd / "my_AR.ckpt").is_file(), out[-2000:]
    if "--cfg job" in cmd:
        assert "stage: ar" in out
    if "dry_run=true" in cmd:
        n = next((n for k, n in DRY_RUNS if re.fullmatch(k, cmd)), None)
        assert n is not None, f"a dry run with no DRY_RUNS entry (the members it must list): {cmd}"
        assert f"{n} members (dry run: nothing trained)" in out, out[-3000:]
    if cmd.startswith("python -m magvit2.sample"):
        assert "samples (step 6)" in out, out[-2000:]
    if "hydra.launcher.detach=true" in cmd and "dry_run=true" not in cmd:
        m = re.search(r"reconnect with: python -m magvit2.sweep status (\S+)", out)
        assert m and "submitted, not waiting" in out, out[-3000:]
        assert f"--root {cwd / 'outputs'}" in out  # the default root: the README's status commands need no --root
        fill["<sweep id>"] = m.group(1)
    if cmd.startswith("python -m magvit2.sweep list"):
        assert fill["<sweep id>"] in out and "ended" in out, out[-2000:]
    if cmd.startswith("python -m magvit2.sweep status") and "--wait" in cmd:
        assert "finished: 2" in out and "sweep ended: MLflow parent run FINISHED" in out, out[-3000:]
        import mlflow
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])  # the members logged to the README's server
        exp = client.get_experiment_by_name("magvit2-ar")
        runs = client.search_runs([exp.experiment_id], f"tags.`magvit2.sweep_id` = '{fill['<sweep id>']}'")
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        assert len(kids) == 2 and all(r.info.status == "FINISHED" for r in kids), [r.info for r in runs]
