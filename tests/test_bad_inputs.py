"""The bad-input and fault corpus: every case goes through the real command line with real files.

Each case asserts the exit code, that the message names the problem (key, file or value), that no
traceback is printed, and that nothing the user had is lost or overwritten. The table of this corpus is
in ``docs/bad_inputs.md``; keep the two in step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST
from feddymem.cli import main
from feddymem.io import load_checkpoint
from synthetic import dataset_yaml, make_product

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a digest of its bytes: 'nothing was lost or overwritten'."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(capsys, *args: str, code: int = 2, says: str | None = None) -> str:
    """Run ``feddymem *args`` in this process; check the exit code, the message and the absence of a
    traceback; return stderr."""
    try:
        got = main(list(args))
    except SystemExit as exit_:  # argparse
        got = exit_.code
    out, err = capsys.readouterr()
    assert got == code, f"exit {got}, expected {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err
    if says is not None:
        assert says in err, f"{says!r} not in stderr: {err}"
    if code == 2 and says is not None and not args[0].startswith("-"):
        # One line per problem: the error is the last line, prefixed "error:" (argparse: "prog: error:").
        assert "error:" in err.strip().splitlines()[-1]
    return err


def subprocess_cli(*args: str, prefix: list[str] | None = None, env: dict | None = None, timeout: int = 300):
    """``feddymem *args`` as its own process (for dropped privileges, mount namespaces, several ranks)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "feddymem.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def without_write_permission() -> list[str]:
    """A command prefix under which a read-only (0555) folder really is read-only: tests run as root in CI,
    and root ignores permissions unless its capabilities are dropped."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder read-only for this process")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


# --- data sets and a trained run, shared by the cases --------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A 2-product synthetic data set (MVTec layout), its YAML at ``small / 'synthetic.yaml'``."""
    root = tmp_path_factory.mktemp("small")
    folders = [make_product(root, f"p{i}", n_train=8, seed=i, angle=i) for i in range(2)]
    return dataset_yaml(root, folders, num_clients=2)


def _train_args(yaml: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", f"dataset={yaml}", f"output_dir={out}", f"name={name}", *FAST, "data.num_clients=2", *extra]


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory) -> Path:
    """A finished run (round 0 only). It is trained into a folder that a failed run left behind (config and
    logs, no checkpoint), which a rerun with the same name must be able to reuse."""
    out = tmp_path_factory.mktemp("runs")
    stopped = out / "run"
    (stopped / "logs").mkdir(parents=True)
    (stopped / "config.yaml").write_text("left: by a run that failed its checks\n")
    assert main(_train_args(small, out, "run", "federation.rounds=0")) == 0
    assert load_checkpoint(stopped / "checkpoints" / "last.ckpt")["round"] == 0
    return stopped


# --- 1. config values: range, finiteness, type and shape, named, before any data is read --------------
CONFIG_CASES = [
    ("threshold_percentile=150", "'threshold_percentile' must be <= 100, got 150.0"),
    ("threshold_percentile=-1", "'threshold_percentile' must be >= 0"),
    ("optim.lr=nan", "'optim.lr' must be a finite number, got nan"),
    ("optim.lr=0", "'optim.lr' must be > 0"),
    ("data.dirichlet_alpha=-1", "'data.dirichlet_alpha' must be > 0, got -1.0"),
    ("data.dirichlet_alpha=0", "'data.dirichlet_alpha' must be > 0, got 0.0"),
    ("optim.eval_batch_size=0", "'optim.eval_batch_size' must be >= 1, got 0"),
    ("federation.min_clients=0", "'federation.min_clients' must be >= 1, got 0"),
    ("data.min_train_per_client=0", "'data.min_train_per_client' must be >= 1, got 0"),
    ("data.holdout_fraction=1", "'data.holdout_fraction' must be < 1"),
    ("server.max_upload_mb=inf", "'server.max_upload_mb' must be a finite number"),
    ("model.backbone.pool_size=2", "'model.backbone.pool_size' must be odd"),
    ("seed=-3", "'seed' must be >= 0"),
    ("federation.rounds=two", "invalid value for 'federation.rounds'"),
    ("federation.roundz=2", "unknown config key 'federation.roundz'"),
    ("federation.accelerator=tpu", "'federation.accelerator' must be one of auto, cpu, cuda, gpu, mps; got 'tpu'"),
    ("data.crop_size=300", "'data.crop_size' (300) must not exceed 'data.image_size'"),
    ("model.backbone.layers=[2,2]", "'model.backbone.layers' lists a level twice"),
    ("data.products=3", "'data.products' in command-line overrides must be a list, got the value 3"),
    ("federation.rounds", "override 'federation.rounds' is not of the form key=value"),
    ("data.products[5].root=/x", "cannot set 'data.products[5].root' from the command line: 'data.products' has 2"),
    ("data.products[0].rot=/x", "cannot set 'data.products[0].rot' from the command line: Key 'rot' not in"),
    ("data.num_clients[0]=3", "'data.num_clients' is not a list"),
]


@pytest.mark.parametrize(("override", "message"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values_are_named_before_work_starts(override, message, small, tmp_path, capsys):
    cli(capsys, *_train_args(small, tmp_path, "r"), override, says=message)
    assert not (tmp_path / "r").exists()  # nothing claimed


def test_table_that_gives_out_more_than_a_product(small, tmp_path, capsys):
    args = _train_args(small, tmp_path, "r", "data.partition=table", "data.table=[[0.7,0.5],[0.7,0.5]]")
    cli(capsys, *args, says="'data.table' gives out 1.4 of product 'p0' (column 0)")


DATASET_YAMLS = [
    ("products_mapping.yaml", "name: x\nproducts:\n  p0: {root: /tmp}\n", "'data.products' in {path} must be a list"),
    ("list.yaml", "- a\n- b\n", "'data' in {path} must be a mapping of keys, got a list"),
    (
        "unknown.yaml",
        "name: x\nproducts: [{name: a, root: /tmp, colour: red}]\n",
        "unknown config key 'data.products[0].colour' in {path}",
    ),
    ("no_name.yaml", "name: x\nproducts: [{root: /tmp}]\n", "config value(s) missing: data.products[0].name"),
    ("broken.yaml", "name: [x\n", "cannot parse config file {path}"),
    (
        "window.yaml",
        "name: x\nproducts: [{name: a, root: /tmp, window: [10, 5]}]\n",
        "'data.products[0].window' must be [low, high] with low < high",
    ),
]


@pytest.mark.parametrize(("file", "text", "message"), DATASET_YAMLS, ids=[c[0] for c in DATASET_YAMLS])
def test_bad_dataset_files_name_file_and_key(file, text, message, tmp_path, capsys):
    path = tmp_path / file
    path.write_text(text)
    cli(capsys, "data", "check", str(path), says=message.format(path=path))


def test_unknown_dataset_lists_the_valid_ones(capsys):
    cli(capsys, "config", "dataset=nope", says="unknown dataset 'nope': valid choices are elpv")


# --- 3. images: every mode decoded, or refused with the file named ------------------------------------
def _product_with(tmp_path: Path, name: str, bad: dict[str, bytes | Image.Image], **kwargs) -> Path:
    folder = make_product(tmp_path, name, n_train=6, **kwargs)
    for rel, content in bad.items():
        target = folder / rel
        if isinstance(content, Image.Image):
            content.save(target)
        else:
            target.write_bytes(content)
    return dataset_yaml(tmp_path, [folder], num_clients=2)


def test_16_bit_scans_are_scaled_not_white_and_said(tmp_path, capsys):
    ramp = np.tile(np.linspace(1000, 3000, 96), (96, 1)).astype(np.uint16)  # a CT-like 16-bit range
    yaml = _product_with(tmp_path, "ct", {"train/good/000.png": Image.fromarray(ramp)})
    err = cli(capsys, "data", "check", str(yaml), code=0, says="16-bit or floating point")
    assert "window: [low, high]" in err
    from feddymem.data.datasets import read_image

    decoded = np.asarray(read_image(str(tmp_path / "ct/train/good/000.png")))
    assert decoded.min() == 0 and decoded.max() == 255 and 100 < decoded.mean() < 155  # Pillow alone: all 255


def test_float_image_without_a_finite_value_is_refused(tmp_path, capsys):
    nan = Image.fromarray(np.full((96, 96), np.nan, dtype=np.float32), "F")
    yaml = _product_with(tmp_path, "f", {"train/good/001.tif": nan})
    cli(capsys, "data", "check", str(yaml), says=f"{tmp_path / 'f/train/good/001.tif'}: no finite pixel value")


def test_corrupt_image_is_named(tmp_path, capsys):
    yaml = _product_with(tmp_path, "c", {"test/good/000.png": b"\x89PNG\r\n\x1a\n truncated"})
    cli(capsys, "data", "check", str(yaml), says=f"cannot decode image {tmp_path / 'c/test/good/000.png'}")


def test_mask_of_another_size_is_named(tmp_path, capsys):
    yaml = _product_with(tmp_path, "m", {"ground_truth/spot/000_mask.png": Image.new("L", (50, 50))})
    cli(capsys, "data", "check", str(yaml), says=f"mask {tmp_path / 'm/ground_truth/spot/000_mask.png'} is 50×50")


def test_missing_data_folder_is_named(tmp_path, capsys):
    path = tmp_path / "d.yaml"
    path.write_text(f"name: d\nproducts: [{{name: a, root: '{tmp_path / 'absent'}'}}]\n")
    cli(capsys, "train", f"dataset={path}", f"output_dir={tmp_path}", says=str(tmp_path / "absent"))
    assert not any(p.name != "d.yaml" for p in tmp_path.iterdir())  # no run folder left behind


def test_data_check_lists_every_problem_at_once(tmp_path, capsys):
    """Two missing folders and, in a third product, a corrupt image and a mask of another size: one run of
    ``data check`` names them all, so that a user fixes them in one go."""
    good = make_product(tmp_path, "good", n_train=6)
    path = tmp_path / "d.yaml"
    path.write_text(
        "name: d\nproducts:\n"
        f"  - {{name: a, layout: mvtec, root: '{tmp_path / 'absent_a'}'}}\n"
        f"  - {{name: b, layout: mvtec, root: '{tmp_path / 'absent_b'}'}}\n"
        f"  - {{name: good, layout: mvtec, root: '{good}'}}\n"
    )
    err = cli(capsys, "data", "check", str(path), says="2 problems with the data set")
    assert "product 'a'" in err and str(tmp_path / "absent_a") in err
    assert "product 'b'" in err and str(tmp_path / "absent_b") in err
    (good / "test/good/000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (good / "train/good/001.png").write_bytes(b"not an image")
    only_good = dataset_yaml(tmp_path, [good], num_clients=1)
    err = cli(capsys, "data", "check", str(only_good), says="2 problems with")
    assert str(good / "test/good/000.png") in err and str(good / "train/good/001.png") in err


# --- 8. test sets that cannot give a metric ---------------------------------------------------------
def test_test_set_without_anomalies_is_warned_about(tmp_path, capsys):
    folder = make_product(tmp_path, "clean", n_train=6)
    shutil.rmtree(folder / "test/spot")
    shutil.rmtree(folder / "ground_truth")
    err = cli(capsys, "data", "check", str(dataset_yaml(tmp_path, [folder], num_clients=2)), code=0)
    assert "product 'clean': its test set has no anomalous image" in err
    assert "client 0: its test set has no anomalous image" in err


# --- 2 and 5. output folders and run folders ------------------------------------------------------
def test_output_dir_that_is_a_file(small, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    cli(capsys, *_train_args(small, blocker, "r"), says=f"output folder {blocker} is a file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_read_only_output_folder(small, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    result = subprocess_cli(*_train_args(small, out, "r")[0:], prefix=without_write_permission())
    assert result.returncode == 2, result.stderr
    assert f"cannot write output folder {out}: Permission denied" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and list(out.iterdir()) == []


def test_finished_run_is_never_overwritten(trained, small, capsys):
    before = snapshot(trained)
    cli(capsys, *_train_args(small, trained.parent, trained.name), says="already holds checkpoints; continue it with")
    assert snapshot(trained) == before


def test_a_folder_that_is_not_a_run_is_left_alone(small, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    cli(capsys, *_train_args(small, tmp_path, "photos"), says="is not a FedDyMem run folder")
    assert snapshot(photos) == {"holiday.jpg": hashlib.sha256(b"precious").hexdigest()}


def test_resume_without_checkpoint(trained, tmp_path, capsys):
    stopped = tmp_path / "stopped"  # a run that stopped before its first checkpoint
    stopped.mkdir()
    shutil.copy(trained / "config.yaml", stopped / "config.yaml")
    cli(capsys, "train", f"resume={stopped}", says="cannot resume: no checkpoint")
    cli(capsys, "train", f"resume={tmp_path / 'never'}", says=f"cannot resume: {tmp_path / 'never' / 'config.yaml'}")


@pytest.mark.slow
def test_full_disk_while_checkpointing_keeps_the_last_round_resumable(small, trained, tmp_path):
    """Round 1's checkpoint does not fit: one line, and round 0 stays resumable (then resumes)."""
    size = (trained / "checkpoints" / "last.ckpt").stat().st_size
    args = [*_train_args(small, "{out}", "full", "federation.rounds=1", "federation.local_epochs=1")]
    keep = tmp_path / "kept"
    tmpfs = tmp_path / "tiny"
    tmpfs.mkdir()
    inner = " ".join(a.replace("{out}", str(tmpfs)) for a in args)
    script = (
        f"mount -t tmpfs -o size={int(2.6 * size) + 65536} tmpfs {tmpfs} || exit 99; "
        f"PYTHONPATH={ROOT / 'src'} {sys.executable} -m feddymem.cli {inner} --quiet; code=$?; "
        f"cp -r {tmpfs / 'full'} {keep}; exit $code"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if result.returncode == 99 or "Operation not permitted" in result.stderr[:300]:
        pytest.skip("no private mount namespace here (needs root or user namespaces)")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "No space left on device" in last and "round 0 is the last complete one" in last
    assert f"feddymem train resume={tmpfs / 'full'}" in last
    assert load_checkpoint(keep / "checkpoints" / "last.ckpt")["round"] == 0  # intact, not torn
    assert not list((keep / "checkpoints").glob(".*.tmp"))  # no half-written file left
    resumed = subprocess_cli("train", f"resume={keep}", "quiet=true")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(keep / "checkpoints" / "last.ckpt")["round"] == 1


# --- 6. predict, export, report ---------------------------------------------------------------------
def test_predict_refuses_an_existing_out_folder(trained, small, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "old.png").write_bytes(b"old heatmap")
    images = str(small.parent / "p0" / "test")
    cli(
        capsys,
        "predict",
        str(trained / "checkpoints/last.ckpt"),
        images,
        "--out",
        str(out),
        says=f"predict --out folder {out} already holds files",
    )
    assert snapshot(out) == {"old.png": hashlib.sha256(b"old heatmap").hexdigest()}


def test_predict_batch_size_zero(trained, tmp_path, capsys):
    cli(
        capsys,
        "predict",
        str(trained / "checkpoints/last.ckpt"),
        str(tmp_path),
        "--batch-size",
        "0",
        says="argument --batch-size: must be at least 1, got 0",
    )


def test_predict_negative_client(trained, tmp_path, capsys):
    cli(
        capsys,
        "predict",
        str(trained / "checkpoints/last.ckpt"),
        str(tmp_path),
        "--client",
        "-1",
        says="argument --client: client numbers start at 0",
    )


def test_predict_unknown_client(trained, small, tmp_path, capsys):
    cli(
        capsys,
        "predict",
        str(trained / "checkpoints/last.ckpt"),
        str(small.parent / "p0/test"),
        "--client",
        "9",
        "--out",
        str(tmp_path / "o"),
        says="has no client 9; it has [0, 1]",
    )


def test_predict_nothing_decodable_exits_non_zero(trained, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"garbage")
    err = cli(
        capsys,
        "predict",
        str(trained / "checkpoints/last.ckpt"),
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "o"),
        says="none of the 1 input image(s) could be decoded; nothing was scored",
    )
    assert "skipped: cannot decode image" in err and not (tmp_path / "o").exists()


def test_predict_empty_folder_and_missing_input(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    ckpt = str(trained / "checkpoints/last.ckpt")
    cli(capsys, "predict", ckpt, str(tmp_path / "empty"), says="no image files (.bmp")
    cli(capsys, "predict", ckpt, str(tmp_path / "nope.png"), says=f"no such image or folder: {tmp_path / 'nope.png'}")


@pytest.mark.slow
def test_predict_into_a_read_only_folder(trained, small, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    ckpt = str(trained / "checkpoints/last.ckpt")
    result = subprocess_cli(
        "predict",
        ckpt,
        str(small.parent / "p0/test/good"),
        "--out",
        str(out / "p"),
        "--quiet",
        prefix=without_write_permission(),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot write predict --out folder {out / 'p'}: Permission denied" in result.stderr


def test_export_into_a_folder_path_and_unknown_client(trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoints/last.ckpt")
    cli(capsys, "export", ckpt, "--out", str(tmp_path), says=f"export --out {tmp_path} is a folder")
    cli(capsys, "export", ckpt, "--client", "7", says="has no client 7")


def test_checkpoint_missing_truncated_or_malicious(trained, small, tmp_path, capsys):
    images = str(small.parent / "p0/test/good")
    cli(capsys, "predict", str(tmp_path / "none.ckpt"), images, says="checkpoint not found")
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes((trained / "checkpoints/last.ckpt").read_bytes()[:5000])
    cli(capsys, "export", str(torn), says=f"cannot read checkpoint {torn}: not a torch checkpoint, or truncated")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "feddymem-checkpoint", "version": 1, "clients": Payload()}, evil)
    err = cli(capsys, "predict", str(evil), images, says="holds pickled objects (posix.system)")
    assert "weights_only" not in err and not marker.exists()


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    cli(capsys, "report", str(tmp_path), says=f"no metrics.json in {tmp_path}")


def test_report_on_a_truncated_metrics_json(trained, tmp_path, capsys):
    run = tmp_path / "cut"
    shutil.copytree(trained, run)
    text = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(text[: len(text) // 2])
    cli(capsys, "report", str(run), says=f"the run's metrics {run / 'metrics.json'} is not valid JSON")


def test_resume_with_model_settings_that_do_not_fit_the_checkpoint(trained, tmp_path, capsys):
    run = tmp_path / "resumed"
    shutil.copytree(trained, run)
    before = snapshot(run)
    cli(capsys, "train", f"resume={run}", "model.backbone.layers=[1,2]", says="cannot resume client 0: the saved state")
    assert snapshot(run) == before


def test_flower_certificates_where_they_cannot_be_written(tmp_path, capsys):
    pytest.importorskip("cryptography")
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    cli(capsys, "flower", "certificates", "--host", "localhost", "--out", str(blocker), says=str(blocker))
    assert blocker.read_text() == "mine"


def test_bench_render_without_results(tmp_path, capsys):
    cli(capsys, "bench", "render", "--out", str(tmp_path), says=f"{tmp_path / 'results.json'} not found")


# --- 7. logs after resume, strict JSON --------------------------------------------------------------
def test_metrics_json_is_strict(trained):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    metrics = json.loads((trained / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["rounds"][0]["round"] == 0


# --- 4. an error on one process of several ------------------------------------------------------------
@pytest.mark.slow
def test_error_on_one_rank_is_the_last_line_and_the_others_are_quiet(tmp_path):
    import socket

    p0 = make_product(tmp_path, "p0", n_train=6, seed=0)
    p1 = make_product(tmp_path, "p1", n_train=6, seed=1, angle=1)
    (p1 / "train/good/000.png").write_bytes(b"broken")  # only client 1 (process 1) trains on p1
    yaml = dataset_yaml(tmp_path, [p0, p1], num_clients=2, partition="table", table="[[1, 0], [0, 1]]")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess_cli(
        *_train_args(yaml, tmp_path / "runs", "mp", "federation.devices=2", "federation.accelerator=cpu"),
        env={"MASTER_PORT": str(port)},
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error: process 1 of 2: cannot decode image") and "p1/train/good/000.png" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1  # process 0 stopped quietly
