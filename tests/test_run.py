"""The command line (lowbit.run): every method on the packaged data, a checkpoint every epoch
from which a killed run resumes bit-identical, torchrun with 2 gloo processes against one
process, and bad settings named."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_fake_cifar
from lowbit import recipes, run

ROOT = Path(__file__).resolve().parents[1]
# the packaged digits with the MLP: a few seconds per run
QUICK = ["--data", "digits", "--model", "mlp", "--epochs", "2", "--start-epochs", "1",
         "--batch-size", "64", "--no-progress"]


def _cli(args, tmp_path, env=None, launcher=None):
    """``python -m lowbit.run`` (or under ``launcher``) in a subprocess, on one thread."""
    full_env = {**os.environ, "LOWBIT_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")]), **(env or {})}
    cmd = (launcher or [sys.executable]) + ["-m", "lowbit.run"] + args
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.parametrize("method,extra", [
    ("fp", []), ("sgd", ["--weight-bits", "4"]), ("ste", ["--weight-bits", "4", "--act-bits", "4"]),
    ("psgd", ["--weight-bits", "4"]), ("slb", ["--weight-bits", "2"]),
    ("ste", ["--weight-bits", "4", "--grad-quantizer", "psq", "--grad-bits", "4"]),
    ("fp", ["--grad-quantizer", "bhq"]), ("slb", ["--weight-bits", "2", "--grad-quantizer", "pt"])])
def test_every_method_runs_on_the_packaged_data(method, extra, tmp_path, data_home):
    result = run.main(["--method", method, *extra, *QUICK, "--out", str(tmp_path / "out")])
    assert result["deployed_acc"] > 20 and result["epochs"] == 2  # chance is 10%
    # its training steps' throughput, which python -m lowbit.bench cli sets against a bare loop
    assert 0 < result["train_images_per_second"] < float("inf")
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[-1]["test_acc"]) > 20
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert state and all(torch.isfinite(v).all() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_the_console_script_is_installed():
    script = Path(sys.executable).with_name("lowbit")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--grad-quantizer" in out.stdout


def test_yaml_config_and_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("method: psgd\nweight-bits: 3\nepochs: 4\nseed: 2\n")
    cfg = run.config_from_args(["--config", str(tmp_path / "run.yaml"), "--epochs", "6"])
    assert (cfg.method, cfg.weight_bits, cfg.epochs, cfg.seed) == ("psgd", 3, 6, 2)


@pytest.mark.parametrize("args,message", [
    (["--method", "adam"], "invalid choice: 'adam'"),
    (["--weight-bits", "40"], "weight_bits for ste must be"),
    (["--method", "psgd", "--weight-bits", "1"], "weight_bits for psgd"),
    (["--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--start-epochs", "5", "--epochs", "5"], "start_epochs must be between 0 and epochs=5"),
    (["--grad-quantizer", "ptq"], "invalid choice: 'ptq'"),
])
def test_bad_settings_are_named(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        run.config_from_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--data", "cifar10", "--data-dir", "/no/such/folder"], "'/no/such/folder' does not exist"),
    (["--data", "cifar10"], "needs --data-dir"),
    (["--data", "nosuchmodule:load"], "cannot import module 'nosuchmodule'"),
    (["--model", "os:no_such_function"], "module 'os' has no function 'no_such_function'"),
    (["--model", "notamodel"], "notamodel"),
    (["--sync-bn", "--device", "cpu"], "--sync-bn needs GPUs"),
])
def test_bad_data_and_models_are_named(args, message, tmp_path, data_home, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(args + ["--out", str(tmp_path / "out"), "--no-progress"])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_unknown_yaml_key_and_missing_file_are_named(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("method: slb\nbitz: 2\n")
    for path, message in ((tmp_path / "run.yaml", "unknown setting(s) ['bitz']"),
                          (tmp_path / "none.yaml", "does not exist")):
        with pytest.raises(SystemExit):
            run.config_from_args(["--config", str(path)])
        assert message in capsys.readouterr().err


def test_a_checkpoint_of_other_settings_is_refused(tmp_path, data_home, capsys):
    out = str(tmp_path / "out")
    run.main(["--method", "fp", *QUICK, "--epochs", "1", "--out", out])
    with pytest.raises(SystemExit):
        run.main(["--method", "fp", *QUICK, "--epochs", "1", "--seed", "1", "--out", out])
    assert "seed: 0 there, 1 now" in capsys.readouterr().err


@pytest.mark.parametrize("method", [
    ["--method", "ste", "--grad-quantizer", "psq", "--grad-bits", "4", "--epochs", "3"],
    ["--method", "slb", "--weight-bits", "2", "--epochs", "3"]])
def test_a_killed_run_resumes_bit_identical(method, tmp_path):
    """Killed (SIGKILL) in its second epoch, then the same command again: the same final
    model, to the bit, and the same metrics as a run that was never interrupted."""
    args = [*QUICK, *method]
    whole = _cli(args + ["--out", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    steps = -(-1437 // 64)  # digits' training set, global batches per epoch
    killed = _cli(args + ["--out", "killed"], tmp_path,
                  env={"LOWBIT_RUN_KILL_AT_STEP": str(steps + steps // 2)})
    assert killed.returncode == -signal.SIGKILL
    rows = list(csv.DictReader(open(tmp_path / "killed" / "metrics.csv")))
    assert len(rows) == 1  # the first epoch's checkpoint, nothing of the second
    resumed = _cli(args + ["--out", "killed"], tmp_path)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    assert (tmp_path / "whole" / "metrics.csv").read_text() == \
        (tmp_path / "killed" / "metrics.csv").read_text()


#: torchrun against one process: the largest difference allowed between the two runs'
#: final weights (float32 sums taken in another order, over 2 epochs)
DDP_TOLERANCE = 1e-4


def test_torchrun_two_processes_match_one(tmp_path):
    """Two gloo processes with the same global batch train the same model as one process:
    a model without BatchNorm (named by module:function, so that the per-process batch
    statistics do not enter), the tiny CIFAR-format data set the test writes."""
    write_fake_cifar(tmp_path / "cifar", n=48, seed=1)
    (tmp_path / "tiny_model.py").write_text(
        "from torch import nn\n\n"
        "def model():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    args = ["--method", "fp", "--data", "cifar10", "--data-dir", str(tmp_path / "cifar"),
            "--model", "tiny_model:model", "--epochs", "2", "--batch-size", "16", "--lr", "0.05",
            "--no-progress"]
    one = _cli(args + ["--out", "one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(args + ["--out", "two"], tmp_path, launcher=[
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 processes" in two.stdout
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    diff = max((a[k] - b[k]).abs().max().item() for k in a if isinstance(a[k], torch.Tensor))
    assert diff < DDP_TOLERANCE, diff
    rows = [list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in ("one", "two")]
    for r1, r2 in zip(*rows):
        assert abs(float(r1["train_loss"]) - float(r2["train_loss"])) < 1e-4


@pytest.mark.parametrize("method,bits,grads", [("sgd", 4, None), ("ste", 4, None),
                                               ("psgd", 4, None), ("slb", 2, None),
                                               ("ste", 4, "psq")])
def test_one_process_trains_the_books_recipe_bit_for_bit(method, bits, grads, tmp_path, data_home):
    """The command line on one process is the book's Part IV recipe (recipes.train_lowbit):
    the same deployed weights, to the bit, and so the same accuracy."""
    r = recipes.Recipe(data="digits", model="mlp", batch_size=64, seed=0)
    cfg = recipes.LowBitConfig(method, bits, None, grads, 4, epochs=2, start_epochs=1)
    model, history = recipes.train_lowbit(r, cfg, progress=False)
    extra = ["--grad-quantizer", grads, "--grad-bits", "4"] if grads else []
    result = run.main(["--method", method, "--weight-bits", str(bits), *extra, *QUICK,
                       "--out", str(tmp_path / "out")])
    assert result["deployed_acc"] == history.extra["deployed_acc"][-1]
    mine = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    book = recipes.deploy(model, cfg).state_dict()
    tensors = [k for k, v in book.items() if isinstance(v, torch.Tensor)]
    assert tensors and all(torch.equal(mine[k], book[k]) for k in tensors)


# ----------------------------------------------------------------------------- nothing lost
@pytest.mark.parametrize("yaml_text,message", [
    ("epochs: true\n", "epochs must be a positive integer, got True"),
    ("batch-size: true\n", "batch_size must be a positive integer, got True"),
    ("lr: true\n", "lr must be a finite number ≥ 0, got True"),
    ("progress: 'no'\n", "progress must be true or false, got 'no'"),
    ("seed: true\n", "seed must be a non-negative integer, got True"),
    ("out: null\n", "out must be a non-empty string, got None"),
    ("out: 5\n", "out must be a non-empty string, got 5"),
    ("weight-decay: 0.1\nweight_decay: 0.2\n", "gives weight_decay twice"),
    ("method: fp\nweight-bits: 40\n", "method fp trains at full precision: it takes no weight_bits"),
    ("epochs: [3\n", "line 2, column 1"),
    ("epochs: !!python/object/apply:os.system ['true']\n", "no tags"),
])
def test_yaml_values_are_checked_by_type_and_meaning(yaml_text, message, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml_text)
    with pytest.raises(SystemExit) as e:
        run.config_from_args(["--config", str(tmp_path / "run.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def _fp(out, *extra):
    return ["--method", "fp", *QUICK, "--epochs", "1", "--out", str(out), *extra]


def test_a_checkpoint_that_fails_its_checksum_is_refused_not_discarded(tmp_path, data_home, capsys):
    out = tmp_path / "out"
    run.main(_fp(out))
    blob = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(blob[:-10])             # truncated
    with pytest.raises(SystemExit):
        run.main(_fp(out))
    err = capsys.readouterr().err
    assert "fails its checksum" in err and "--restart" in err and str(out / "checkpoint.pt") in err
    assert (out / "checkpoint.pt").read_bytes() == blob[:-10]    # kept as it was
    assert run.main(_fp(out, "--restart"))["epochs"] == 1        # --restart starts over


@pytest.mark.parametrize("epoch", [99, -2, 0])
def test_a_checkpoint_whose_epoch_contradicts_the_run_is_refused(epoch, tmp_path, data_home, capsys):
    import io
    from lowbit.cache import read_entry, write_entry
    out = tmp_path / "out"
    run.main(_fp(out))
    state = torch.load(io.BytesIO(read_entry(out / "checkpoint.pt")), weights_only=True)
    state["epoch"] = epoch
    buf = io.BytesIO()
    torch.save(state, buf)
    write_entry(out / "checkpoint.pt", buf.getvalue())
    with pytest.raises(SystemExit):
        run.main(_fp(out))
    assert f"it says epoch {epoch} of phase 0, but the run has 1 epochs" in capsys.readouterr().err


def test_two_runs_into_one_out_keep_the_first(tmp_path, data_home, capsys):
    out = tmp_path / "out"
    run.main(_fp(out))
    model = (out / "model.pt").read_bytes()
    with pytest.raises(SystemExit):
        run.main(_fp(out, "--seed", "1"))
    err = capsys.readouterr().err
    assert f"{out} holds a run with other settings (seed: 0 there, 1 now)" in err and "--restart" in err
    assert (out / "model.pt").read_bytes() == model


def test_an_out_that_is_a_file_or_cannot_be_written_is_named_before_training(tmp_path, data_home, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        run.main(_fp(tmp_path / "file"))
    assert "is a file; give a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(SystemExit):
            run.main(_fp(ro))
        assert "cannot be written" in capsys.readouterr().err


def test_a_write_that_fails_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, data_home, capsys, monkeypatch):
    out = tmp_path / "out"
    run.main(_fp(out))
    good = (out / "checkpoint.pt").read_bytes()
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("checkpoint.pt"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(SystemExit):
        run.main(["--method", "fp", *QUICK, "--epochs", "1", "--seed", "3", "--out", str(out), "--restart"])
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_a_killed_writers_temporary_file_is_removed_at_the_next_start(tmp_path, data_home):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (out / f".checkpoint.pt.{dead}.0a1b2c3d.tmp").write_bytes(b"half a checkpoint")
    run.main(_fp(out))
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_data_and_models_that_do_not_fit_are_named(tmp_path, data_home, capsys):
    (tmp_path / "userdata.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def empty(train=True):\n"
        "    return TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))\n"
        "def labels_12(train=True):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.arange(64) % 12)\n"
        "def nan_image(train=True):\n"
        "    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))\n"
        "    x[3, 0, 0, 0] = float('nan')\n"
        "    return TensorDataset(x, torch.arange(64) % 10)\n")
    import sys as _sys
    _sys.path.insert(0, str(tmp_path))
    try:
        for data, message in (("userdata:empty", "returned an empty train set"),
                              ("userdata:labels_12", "it gives 10 outputs per example"),
                              ("userdata:nan_image", "non-finite input value(s) (NaN or inf): check the data")):
            with pytest.raises(SystemExit):
                run.main(["--method", "fp", "--data", data, "--model", "mlp", "--epochs", "1",
                          "--no-progress", "--out", str(tmp_path / data.split(":")[1])])
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, err
    finally:
        _sys.path.remove(str(tmp_path))
