"""The fault matrix (issue #10): bad input and faults through the CLI and the API.

Every case asserts one clear error — exit status 2 and a single line on stderr, no traceback
(CLI), or one :class:`~flipnet.errors.FlipnetError` (API) — and that no file that existed
before was changed or lost (the whole working folder is hashed before and after).

The CLI runs in-process through :func:`flipnet.cli.main` (fast); the cases that need a real
process (a file-size limit, SIGTERM) start ``python -m flipnet``. Every training run is tiny:
digits, 200 images, a 16-unit MLP, one epoch.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flipnet.errors import FlipnetError

torch.set_num_threads(1)

TINY = [
    "train.epochs=1",
    "data.subset=200",
    "model.kwargs.hidden_sizes=[16]",
    "train.device=cpu",
    "train.progress=false",
    "train.plots=false",
    "train.tensorboard=false",
]


# ------------------------------------------------------------------------------------ helpers


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_kept(before: dict[str, str], folder: Path) -> None:
    after = snapshot(folder)
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    assert not lost and not changed, f"lost: {lost}, changed: {changed}"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from flipnet.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc: int, out: str, err: str, *pieces: str, absent: tuple[str, ...] = ()) -> str:
    assert "Traceback" not in out + err, err
    assert rc == 2, f"exit status {rc}\nstdout: {out}\nstderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for piece in pieces:
        assert piece in lines[0], f"{piece!r} not in {lines[0]!r}"
    for piece in absent:
        assert piece not in lines[0], f"{piece!r} in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (the cwd), so default paths like ``runs/`` land inside it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny finished run (trained once per module); tests copy it before touching it."""
    from flipnet.cli import main

    out = tmp_path_factory.mktemp("finished")
    assert main(["train", "digits_bop", *TINY, "output.name=run", "--out", str(out)]) == 0
    return out / "run"


@pytest.fixture
def run_copy(work: Path, finished_run: Path) -> Path:
    dest = work / "runs" / "run"
    shutil.copytree(finished_run, dest)
    return dest


def check_cli_error(capsys, work: Path, argv: list[str], *pieces: str, absent: tuple[str, ...] = ()) -> str:
    before = snapshot(work)
    rc, out, err = cli(capsys, *argv)
    line = assert_one_error(rc, out, err, *pieces, absent=absent)
    assert_kept(before, work)
    return line


def xfail_until(who: str, what: str):
    return pytest.mark.xfail(strict=True, reason=f"waits for {who}: {what}")


# ------------------------------------------------------------------- recipes and overrides (CLI)

CONFIG_CASES = [
    pytest.param(["train.epoch=1"], ["train.epoch", "did you mean 'train.epochs'"], id="typo-key"),
    pytest.param(["trian.epochs=1"], ["'trian'", "did you mean 'train'"], id="typo-section"),
    pytest.param(["train.epochs=ten"], ["train.epochs must be an integer", "'ten'"], id="bad-type-int"),
    pytest.param(["train.epochs=2.5"], ["train.epochs must be an integer"], id="bad-type-float-for-int"),
    pytest.param(["data.augment=maybe"], ["data.augment[0] must be crop or flip"], id="bad-augment-name"),
    pytest.param(["train.plots=maybe"], ["train.plots must be true/false"], id="bad-type-bool"),
    pytest.param(["optim.real_kwargs.lr=.nan"], ["optim.real_kwargs.lr must be a finite number"], id="nan-kwarg"),
    pytest.param(["train.grad_clip=inf"], ["train.grad_clip must be a number"], id="inf-word"),
    pytest.param(["train.grad_clip=.inf"], ["train.grad_clip must be a finite number"], id="inf-yaml"),
    pytest.param(["optim.weight_clip=.nan"], ["optim.weight_clip must be a finite number"], id="nan-positive-field"),
    pytest.param(["seed=99999999999999999999999999"], ["seed is too large"], id="huge-int"),
    pytest.param(["seed=-1"], ["seed must be an integer in 0..4294967295"], id="negative-seed"),
    pytest.param(["seeds=[]"], ["seeds must be a non-empty list"], id="empty-seeds"),
    pytest.param(["model.name=resnet9000"], ["unknown model", "resnet9000"], id="unknown-model"),
    pytest.param(["data.name=digitz"], ["unknown data set 'digitz'", "did you mean 'digits'"], id="unknown-dataset"),
    pytest.param(["optim.binary=bopp"], ["bopp", "bop"], id="unknown-binary-optimizer"),
    pytest.param(["optim.real=adamm"], ["adamm", "adam"], id="unknown-real-optimizer"),
    pytest.param(["optim.binary_kwargs.gamam=1e-3"], ["gamam"], id="unknown-optimizer-kwarg"),
    pytest.param(["model.kwargs.hiden_sizes=[8]"], ["hiden_sizes", "did you mean 'hidden_sizes'"], id="unknown-model-option"),
    pytest.param(["data.options.sbuset=3"], ["no option 'sbuset'", "did you mean 'subset'"], id="unknown-data-option"),
    pytest.param(["model.init=glorot_unifrom"], ["unknown model.init scheme", "did you mean 'glorot_uniform'"], id="unknown-init"),
    pytest.param(["train.epochs"], ["train.epochs", "key.sub=value"], id="override-without-value"),
    pytest.param(["train..epochs=1"], ["empty key part"], id="override-empty-part"),
    pytest.param(["seed.x=1"], ["seed is not a mapping"], id="override-into-scalar"),
    pytest.param(["optim.schedules=[{key: lr, route: real, type: cosinus}]"], ["unknown schedule type 'cosinus'", "did you mean 'cosine'"], id="unknown-schedule-type"),
    pytest.param(["optim.schedules=[{key: gama, route: binary, type: cosine}]"], ["no key 'gama'", "did you mean 'gamma'"], id="schedule-on-missing-key"),
    pytest.param(["data.batch_size=0"], ["data.batch_size must be positive"], id="batch-size-zero"),
    pytest.param(["data.batch_size=-4"], ["data.batch_size must be positive"], id="batch-size-negative"),
    pytest.param(["data.batch_size=2.5"], ["data.batch_size must be an integer"], id="batch-size-float"),
    pytest.param(["data.val_size=5000"], ["data.val_size=5000", "leaves none to train on"], id="val-size-too-big"),
    pytest.param(["data.augment=[flip]"], ["does not allow the 'flip' augmentation", "mirrored digit"], id="augment-flip-digits"),
    pytest.param(["data.augment=true"], ["'digits' has no default augmentation", "87.5%"], id="augment-true-digits"),
    pytest.param(["train.device=gpu"], ["train.device must be auto, cpu, cuda or cuda:N"], id="bad-device"),
    pytest.param(["train.threads=0"], ["train.threads must be positive"], id="zero-threads"),
    pytest.param(["train.precision=fp16"], ["train.precision must be fp32 or tf32 or bf16 or int8 or auto"], id="bad-precision"),
]


@pytest.mark.parametrize(("overrides", "pieces"), CONFIG_CASES)
def test_bad_recipe_values_on_the_command_line(capsys, work: Path, overrides: list[str], pieces: list[str]) -> None:
    base = [o for o in TINY if not any(o.split("=")[0] == x.split("=")[0] for x in overrides)]
    check_cli_error(capsys, work, ["train", "digits_bop", *base, *overrides, "--out", work / "runs"], *pieces)
    assert not (work / "runs").exists() or not any((work / "runs").iterdir()), "a refused run left a folder"


def test_cuda_device_without_cuda(capsys, work: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY[:-4], "train.device=cuda", "--out", work / "runs"],
                    "CUDA is not available")


def test_unknown_recipe(capsys, work: Path) -> None:
    check_cli_error(capsys, work, ["train", "digits_bopp"], "no recipe file or shipped recipe named 'digits_bopp'",
                    "did you mean 'digits_bop'")


BOMB = "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, c in zip(["", *"abcdefgh"], "abcdefghi")
) + "name: bomb\n"


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        pytest.param(BOMB, ["expands to more than"], id="yaml-bomb"),
        pytest.param("a: &a [*a]\n", ["recursive alias"], id="yaml-recursive-alias"),
        pytest.param("train: {epochs: [1\n", ["is not valid YAML"], id="yaml-syntax-error"),
        pytest.param("- 1\n- 2\n", ["must hold a mapping"], id="yaml-not-a-mapping"),
        pytest.param("seed: " + "7" * 4000 + "\n", ["a YAML integer has 4000 digits"], id="yaml-huge-int"),
    ],
)
def test_hostile_recipe_files(capsys, work: Path, text: str, pieces: list[str]) -> None:
    path = work / "recipe.yaml"
    path.write_text(text)
    if text is BOMB:
        assert path.stat().st_size < 1000
    start = time.perf_counter()
    check_cli_error(capsys, work, ["train", path, *TINY], *pieces)
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------------------- data


def test_missing_data_folder(capsys, work: Path) -> None:
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY[1:], "data.name=cifar10", f"data.root={work / 'nope'}",
                                   "data.subset=50", "--out", work / "runs"],
                    "CIFAR-10 pickles", "not found", "data.root=DIR")


def test_corrupt_cifar_pickle(capsys, work: Path) -> None:
    folder = work / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"\x80\x04 not a pickle at all")
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY[1:], "data.name=cifar10", f"data.root={work / 'cifar'}",
                                   "data.subset=50", "--out", work / "runs"], "data_batch_1")


def test_hostile_cifar_pickle_is_not_executed(capsys, work: Path) -> None:
    folder = work / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = work / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps(Evil()))
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY[1:], "data.name=cifar10", f"data.root={work / 'cifar'}",
                                   "data.subset=50", "--out", work / "runs"], "data_batch_1")
    assert not marker.exists(), "the pickle's code ran"


def test_a_last_batch_of_one_trains(capsys, work: Path) -> None:
    """The issue's ``flipnet train digits_bop data.batch_size=4`` used to crash in BatchNorm: the
    1,293 training images (after the 144-image validation split) are 323 * 4 + 1."""
    rc, out, err = cli(capsys, "train", "digits_bop", "data.batch_size=4", "train.epochs=1", "train.device=cpu",
                       "train.progress=false", "train.plots=false", "train.tensorboard=false", "--out", work / "runs")
    assert rc == 0 and "Traceback" not in err, err
    assert "1293 train" in out and "323 steps per epoch" in out  # the lone sample is left out


def test_batch_size_one_with_batchnorm_is_one_error(capsys, work: Path) -> None:
    """binary_mlp's BatchNorm1d cannot train on one example: one sentence, not torch's traceback."""
    check_cli_error(capsys, work, ["train", "digits_bop", "data.batch_size=1", "train.epochs=1", "train.device=cpu",
                                   "train.progress=false", "train.plots=false", "train.tensorboard=false",
                                   "--out", str(work / "runs")],
                    "data.batch_size=2 or more")


# ------------------------------------------------------------------------------- run folders


def test_existing_folder_that_is_not_a_run(capsys, work: Path) -> None:
    mine = work / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("do not lose me")
    (mine / "config.yaml").write_text("my own config\n")
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY, "output.name=mine", "--out", work / "runs"],
                    "was not created by flipnet")


def test_name_escaping_out(capsys, work: Path) -> None:
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY, "output.name=../escaped", "--out", work / "runs"],
                    "output.name")
    assert not (work / "escaped").exists()


def test_absolute_name(capsys, work: Path) -> None:
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY, f"output.name={work / 'abs'}", "--out", work / "runs"],
                    "output.name")
    assert not (work / "abs").exists()


def test_300_character_name(capsys, work: Path) -> None:
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY, "output.name=" + "n" * 300, "--out", work / "runs"],
                    "output.name")


def test_read_only_output_folder(capsys, work: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        check_cli_error(capsys, work, ["train", "digits_bop", *TINY, "--out", ro], str(ro))
    finally:
        ro.chmod(0o755)


def test_read_only_output_folder_simulated(capsys, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same as a read-only folder for a user that root's permissions would not stop: every
    create/open-for-writing under it fails with EACCES."""
    import builtins
    import errno

    ro = (work / "ro").resolve()
    ro.mkdir()
    (ro / "old.txt").write_text("keep")

    def denied(path) -> bool:
        try:
            return Path(os.fspath(path)).resolve().is_relative_to(ro)
        except (TypeError, ValueError):
            return False

    real_mkdir, real_open, real_os_open = Path.mkdir, builtins.open, os.open

    def mkdir(self, *a, **k):
        if denied(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and denied(file):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY, "--out", ro], "Permission denied")


def test_output_folder_is_a_file(capsys, work: Path) -> None:
    (work / "runs").write_text("a file where the runs folder should be")
    check_cli_error(capsys, work, ["train", "digits_bop", *TINY, "--out", work / "runs"], "runs")


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    ("override", "key"),
    [pytest.param("seed=5", "seed", id="changed-seed"), pytest.param("data.batch_size=16", "data.batch_size", id="changed-batch-size")],
)
def test_resume_refuses_a_changed_trajectory(capsys, work: Path, run_copy: Path, override: str, key: str) -> None:
    check_cli_error(capsys, work, ["train", "--resume", run_copy, override], key, "--force")


def test_resume_with_damaged_metrics(capsys, work: Path, run_copy: Path) -> None:
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20] + "\n{not json\n")
    check_cli_error(capsys, work, ["train", "--resume", run_copy, "train.epochs=2", "--force"], "metrics.jsonl")


def test_resume_without_checkpoint(capsys, work: Path, run_copy: Path) -> None:
    (run_copy / "checkpoints" / "last.pt").unlink()
    check_cli_error(capsys, work, ["train", "--resume", run_copy, "train.epochs=2", "--force"], "last.pt")


def test_resume_of_a_folder_that_is_not_a_run(capsys, work: Path) -> None:
    (work / "notarun").mkdir()
    (work / "notarun" / "notes.txt").write_text("x")
    check_cli_error(capsys, work, ["train", "--resume", work / "notarun"], "notarun")


def test_resume_with_damaged_config(capsys, work: Path, run_copy: Path) -> None:
    (run_copy / "config.yaml").write_text("train: {epochs: [\n")
    check_cli_error(capsys, work, ["train", "--resume", run_copy, "train.epochs=2", "--force"], "config.yaml")


def test_resume_with_truncated_checkpoint(capsys, work: Path, run_copy: Path) -> None:
    last = run_copy / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    check_cli_error(capsys, work, ["train", "--resume", run_copy, "train.epochs=2", "--force"], "last.pt")


# -------------------------------------------------------------------- export, eval, summary


def test_export_refuses_to_overwrite_last_pt(capsys, work: Path, run_copy: Path) -> None:
    check_cli_error(capsys, work, ["export", run_copy, "--out", run_copy / "checkpoints" / "last.pt"], "last.pt")


def test_export_refuses_to_overwrite_a_checkpoint(capsys, work: Path, run_copy: Path) -> None:
    check_cli_error(capsys, work, ["export", run_copy, "--out", run_copy / "checkpoints" / "best.pt"], "best.pt")


def _exported(capsys, run: Path) -> Path:
    rc, out, err = cli(capsys, "export", run, "--out", run.parent / "model.safetensors")
    assert rc == 0, err
    return run.parent / "model.safetensors"


def test_truncated_export_to_eval(capsys, work: Path, run_copy: Path) -> None:
    path = _exported(capsys, run_copy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    check_cli_error(capsys, work, ["eval", path], "model.safetensors")


def test_summary_of_an_export_file(capsys, work: Path, run_copy: Path) -> None:
    path = _exported(capsys, run_copy)
    before = snapshot(work)
    rc, out, err = cli(capsys, "summary", path)
    assert "Traceback" not in out + err
    if rc != 0:  # either it summarises the export, or it says in one line what to give instead
        assert_one_error(rc, out, err, "model.safetensors")
    assert_kept(before, work)


def test_summary_with_a_wrong_input_size(capsys, work: Path, run_copy: Path) -> None:
    check_cli_error(capsys, work, ["summary", run_copy, "--input-size", "1", "3", "5", "5"], "--input-size")


def test_eval_of_a_missing_run(capsys, work: Path) -> None:
    check_cli_error(capsys, work, ["eval", work / "runs" / "nope"], "nope")


def test_eval_of_a_checkpoint_of_another_architecture(capsys, work: Path, run_copy: Path) -> None:
    """A checkpoint whose weights do not fit the model its config describes."""
    ckpt = torch.load(run_copy / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["model"]["kwargs"]["hidden_sizes"] = [32]
    other = work / "other.pt"
    torch.save(ckpt, other)
    check_cli_error(capsys, work, ["eval", other], "other.pt")


def test_init_from_a_checkpoint_of_another_architecture(capsys, work: Path, run_copy: Path) -> None:
    tiny = [o for o in TINY if not o.startswith("model.kwargs")]
    check_cli_error(capsys, work, ["train", "digits_bop", *tiny, "model.kwargs.hidden_sizes=[8]",
                                   f"model.init_from={run_copy}", "--out", work / "runs"], "model.init_from")


def test_hostile_pickle_checkpoint(capsys, work: Path) -> None:
    marker = work / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = work / "evil.pt"
    torch.save({"model": Evil()}, path)
    check_cli_error(capsys, work, ["eval", path], "evil.pt", absent=("weights_only=False", "weights_only = False"))
    assert not marker.exists(), "the pickle's code ran"


# ----------------------------------------------------------------------------------- the API


def test_api_errors_are_flipnet_errors(work: Path) -> None:
    from flipnet.train.config import load_config

    before = snapshot(work)
    for overrides in (["train.epoch=1"], ["optim.real_kwargs.lr=.nan"], ["data.val_size=1.5"], ["seed=-3"]):
        with pytest.raises(FlipnetError):
            load_config("digits_bop", overrides)
    with pytest.raises(FlipnetError, match="unknown data set"):
        from flipnet.data import load_dataset

        load_dataset("digitz")
    assert_kept(before, work)


def test_api_disk_full_while_saving(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save raising ENOSPC mid-run: one FlipnetError naming the disk, nothing lost."""
    import errno

    from flipnet.train.config import load_config
    from flipnet.train.loop import Trainer

    keep = work / "runs" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    before = snapshot(work)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(FlipnetError, match="No space left|disk"):
        Trainer.from_config(load_config("digits_bop", [*TINY, f"output.dir={work / 'runs'}"])).fit()
    assert_kept(before, work)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_api_nan_weights_stop_the_run_and_are_never_saved(work: Path) -> None:
    """Sign quantizers map NaN to -1, so a NaN weight used to train on at chance and be saved."""
    from flipnet.errors import TrainingDiverged
    from flipnet.train.callbacks import Callback
    from flipnet.train.config import load_config
    from flipnet.train.loop import Trainer

    class Poison(Callback):
        def on_step_end(self, trainer) -> None:
            if trainer.step == 8:  # in epoch 2 (6 steps per epoch)
                model = trainer.model
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if p.dim() == 1).fill_(float("nan"))

    config = load_config("digits_bop", [*TINY[1:], "train.epochs=3", f"output.dir={work / 'runs'}", "output.name=p"])
    with pytest.raises(TrainingDiverged, match="NaN") as info:
        Trainer.from_config(config, callbacks=[Poison()]).fit()
    assert "\n" not in str(info.value)
    last = torch.load(work / "runs" / "p" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1
    floats = [t for t in _tensors(last["model"]) if t.is_floating_point()]
    assert floats and all(bool(torch.isfinite(t).all()) for t in floats)


# --------------------------------------------------------------------- real processes (slowest)


def _flipnet(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "flipnet", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_disk_full_in_a_real_process(work: Path) -> None:
    """RLIMIT_FSIZE makes every write past 20 kB fail with EFBIG, like a full disk."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    (work / "keep.txt").write_text("precious")
    before = snapshot(work)
    proc = _flipnet(["train", "digits_bop", *TINY[:1], "data.subset=200", "train.device=cpu", "train.progress=false",
                     "train.plots=false", "train.tensorboard=false", "--out", work / "runs"], work, preexec_fn=limit)
    out, err = proc.communicate(timeout=300)
    assert_one_error(proc.returncode, out, err, "File too large")
    assert_kept(before, work)


def test_sigterm_saves_like_ctrl_c(work: Path) -> None:
    proc = _flipnet(["train", "digits_bop", "train.epochs=400", "train.device=cpu", "train.progress=false",
                     "train.plots=false", "train.tensorboard=false", "output.name=term", "--out", work / "runs"], work)
    run = work / "runs" / "term"
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never logged an epoch"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err, err
    assert proc.returncode != 0
    assert (run / "checkpoints" / "last.pt").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert int(ckpt.get("epoch", 0)) >= 1 or int(ckpt.get("step", 0)) > 0
