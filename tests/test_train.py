"""Training loop, seeding and the model cache."""
import pytest
import torch

from lowbit import cache, data, models, train


def _run(seed=0, epochs=1):
    train.seed_everything(seed)
    tr, te = data.get_loaders("digits", batch_size=64, seed=seed)
    net = models.build_model("cnn", (1, 8, 8))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    return net, train.fit(net, tr, epochs, opt, te, progress=False)


def test_fit_learns_and_is_deterministic(data_home):
    net, h = _run(epochs=3)
    assert len(h.test_acc) == 3 and h.test_acc[-1] > 80
    _, h2 = _run(epochs=3)
    assert h2.test_acc == h.test_acc and h2.train_loss == h.train_loss


def test_divergence_is_reported(data_home):
    tr, _ = data.get_loaders("digits", batch_size=64)
    net = models.build_model("mlp", (1, 8, 8))
    opt = torch.optim.SGD(net.parameters(), lr=1e12)
    with pytest.raises(FloatingPointError, match="diverged"):
        train.fit(net, tr, 2, opt, progress=False)


def test_load_or_train_caches_and_verifies(data_home):
    calls = []

    def build():
        torch.manual_seed(0)
        return models.build_model("mlp", (1, 8, 8))

    def fit_it(net):
        calls.append(1)
        tr, te = data.get_loaders("digits", batch_size=64)
        return train.fit(net, tr, 1, torch.optim.SGD(net.parameters(), lr=0.05), te,
                         progress=False)

    cfg = {"name": "t", "lr": 0.05}
    a, ha = cache.load_or_train(cfg, build, fit_it)
    b, hb = cache.load_or_train(cfg, build, fit_it)
    assert len(calls) == 1 and ha.test_acc == hb.test_acc
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values()))
    path = next((data_home / "models").glob("t-*.pt"))
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.warns(UserWarning, match="fails its checksum"):
        cache.load_or_train(cfg, build, fit_it)
    assert len(calls) == 2
    cache.load_or_train({"name": "t", "lr": 0.1}, build, fit_it)  # new config, new entry
    assert len(calls) == 3
    # a valid checksum over NaN weights (an edited entry) is not served: trained again
    import io
    blob = torch.load(io.BytesIO(cache.read_entry(path)), weights_only=True)
    next(v for v in blob["state_dict"].values() if v.is_floating_point()).fill_(float("nan"))
    buf = io.BytesIO()
    torch.save(blob, buf)
    cache.write_entry(path, buf.getvalue())
    with pytest.warns(UserWarning, match="does not load.*non-finite values"):
        c, _ = cache.load_or_train(cfg, build, fit_it)
    assert len(calls) == 4 and all(torch.isfinite(v).all() for v in c.state_dict().values()
                                   if v.is_floating_point())


def _train_once_slowly(args):
    """A worker of the test below: load_or_train a model whose training takes a second and
    leaves a mark in ``marks``."""
    data_dir, marks = args
    import os
    import time
    os.environ["LOWBIT_DATA"] = data_dir

    def slow(net):
        with open(marks, "a") as f:
            f.write("trained\n")
        time.sleep(1.0)
        return train.History()

    net, _ = cache.load_or_train({"name": "shared"}, lambda: torch.nn.Linear(2, 2), slow)
    return net.weight.detach().tolist()


def test_two_processes_that_need_one_model_train_it_once(tmp_path):
    """Notebooks run two at a time (nbval under xdist, say) may need the same model: the
    model cache locks an entry while it trains, so the second process waits and reads it."""
    import multiprocessing as mp
    marks = tmp_path / "marks"
    with mp.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_train_once_slowly, [(str(tmp_path / "data"), str(marks))] * 2)
    assert marks.read_text() == "trained\n" and a == b


def test_models_shapes():
    x = torch.randn(2, 3, 32, 32)
    net = models.resnet20()
    assert net(x).shape == (2, 10)
    assert 0.26e6 < sum(p.numel() for p in net.parameters()) < 0.28e6
    assert models.build_model("cnn", (1, 28, 28))(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("vgg", (1, 28, 28))


def test_cache_key_follows_everything_that_changes_a_model(monkeypatch):
    cfg = {"name": "fp", "seed": 0}
    before = cache.config_key(cfg)
    n = torch.get_num_threads()
    torch.set_num_threads(1 if n != 1 else 2)
    try:
        assert cache.config_key(cfg) != before
    finally:
        torch.set_num_threads(n)
    assert cache.config_key(cfg) == before
    with monkeypatch.context() as m:
        m.setattr(cache, "source_hash", lambda: "changed")
        assert cache.config_key(cfg) != before
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.0")
        assert cache.config_key(cfg) != before
    with monkeypatch.context() as m:
        m.setattr(train, "get_device", lambda: torch.device("cuda"))
        assert cache.config_key(cfg) != before
    with monkeypatch.context() as m:
        m.setenv("LOWBIT_SEED", "3")
        assert cache.config_key(cfg) != before
    assert cache.config_key(cfg) == before
    # the source hash covers the subpackages (lowbit.fqt) too
    from pathlib import Path
    import lowbit
    files = {p.name for p in Path(lowbit.__file__).parent.rglob("*.py")}
    assert "kernel.py" in files


def test_cache_write_failure_returns_the_trained_model(data_home, monkeypatch):
    def build():
        torch.manual_seed(0)
        return models.build_model("mlp", (1, 8, 8))

    monkeypatch.setattr(cache.os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(30, "Read-only file system")))
    with pytest.warns(UserWarning, match="could not write the cache entry"):
        net, hist = cache.load_or_train({"name": "ro"}, build, lambda m: train.History())
    assert isinstance(net, torch.nn.Module)
    assert not [p for p in data_home.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("weights,bits,act,grad", [("sgd", 2, 4, None), ("ste", 1, None, "psq"),
                                                   ("psgd", 2, None, "bhq"), ("slb", 2, 4, "psq")])
def test_train_lowbit_runs_every_method_and_deploys(data_home, weights, bits, act, grad):
    from lowbit import recipes
    r = recipes.Recipe(data="digits", model="cnn8", batch_size=64)
    cfg = recipes.LowBitConfig(weights, bits, act, grad, 4, epochs=2, start_epochs=1)
    model, h = recipes.train_lowbit(r, cfg, progress=False)
    acc = h.extra["deployed_acc"][-1]
    assert 0 <= acc <= 100 and len(h.test_acc) == 2
    again, h2 = recipes.train_lowbit(r, cfg, progress=False)  # from the cache
    assert h2.extra["deployed_acc"] == h.extra["deployed_acc"]
    assert cfg.name == f"W{bits}A{act or 32}G{4 if grad else 32}"


def test_lowbit_config_checks_its_settings():
    from lowbit import recipes
    with pytest.raises(ValueError, match="weights must be one of"):
        recipes.LowBitConfig("lsq", 2)
    with pytest.raises(ValueError, match="weight_bits for psgd must be from 2"):
        recipes.LowBitConfig("psgd", 1)
    with pytest.raises(ValueError, match="quantizer"):
        recipes.LowBitConfig("ste", 2, grad_quantizer="per-channel")
    with pytest.raises(ValueError, match="act_bits=None"):
        recipes.LowBitConfig("fp", None, act_bits=4)


def test_cnn_with_named_widths():
    from lowbit.models import build_model
    m = build_model("cnn_4_8_16", (1, 28, 28))
    assert [l.out_channels for l in m.modules() if isinstance(l, torch.nn.Conv2d)] == [4, 8, 16]
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="positive integers"):
        build_model("cnn_4_x", (1, 28, 28))
    with pytest.raises(ValueError, match="at most 4"):
        build_model("cnn_1_1_1_1_1", (1, 28, 28))


def test_side_by_side_is_one_setting_for_part_iv():
    from lowbit import recipes
    part = recipes.SIDE_BY_SIDE
    r = part.recipe(5)
    assert (r.model, r.batch_size, r.seed) == (part.model, part.batch_size, 5)
    cfg = part.config("ste", 2, 4)
    assert (cfg.epochs, cfg.start_epochs, cfg.weight_bits, cfg.act_bits) == (part.epochs, part.start_epochs, 2, 4)
    assert recipes.SIDE_BY_SIDE_FULL.model == "cnn"
    with pytest.raises(ValueError, match="weights"):
        part.config("xyz", 2)


@pytest.mark.parametrize("ties", [False, True])
def test_channels_last_max_pool_is_nn_max_pool_bit_for_bit(ties):
    """lowbit.models.MaxPool2d (channels-last on a CPU) gives nn.MaxPool2d's output and
    gradient exactly, ties included (quantized inputs have many), and hands the gradient
    back in the usual layout (a ReLU backward with mixed layouts is 30x slower)."""
    from torch import nn
    from lowbit.models import MaxPool2d
    torch.manual_seed(0)
    x = torch.randn(4, 6, 10, 10)
    if ties:
        x = (x * 2).round().clamp(0, 3)
    g = torch.randn(4, 6, 5, 5)
    outs = []
    for pool in (MaxPool2d(2), nn.MaxPool2d(2)):
        xi = x.clone().requires_grad_()
        y = pool(torch.relu(xi))
        y.backward(g)
        outs.append((y, xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][0].is_contiguous() and outs[0][1].is_contiguous()


@pytest.mark.parametrize("shape, kernel, stride", [((4, 6, 10, 10), 2, None),
                                                   ((2, 3, 11, 13), 2, None),
                                                   ((2, 3, 12, 12), 3, None),
                                                   ((2, 3, 9, 10), (3, 2), None),
                                                   ((2, 3, 9, 9), 3, 2)])
def test_max_pool_without_autograd_is_nn_max_pool(shape, kernel, stride):
    """Without autograd, lowbit.models.MaxPool2d pools tiling windows as maxima of strided
    views (models.tile_max): nn.MaxPool2d's values, with ties, NaN, +-inf and the rows and
    columns that fill no window; overlapping windows take the channels-last path."""
    from torch import nn
    from lowbit.models import MaxPool2d
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0, 0, 0, 0], x[1, 1, 2, 3], x[1, 2, 4, 4] = float("nan"), float("inf"), -float("inf")
    for z in (x, (x * 2).round().clamp(0, 3)):
        want = nn.MaxPool2d(kernel, stride)(z)
        with torch.no_grad():
            got = MaxPool2d(kernel, stride)(z)
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    with torch.no_grad(), pytest.raises(RuntimeError, match="too small"):
        MaxPool2d(kernel, stride)(torch.randn(1, 2, 1, 1))  # no window fits: torch's error


def test_small_cnn_trains_as_with_nn_max_pool():
    """Three SGD steps of the book's CNN end on the same weights, bit for bit, whichever
    max-pool it uses: the faster pooling changes no number the book reports."""
    from torch import nn
    torch.manual_seed(0)
    a = models.SmallCNN()
    b = models.SmallCNN()
    b.load_state_dict(a.state_dict())
    b.features = nn.Sequential(*[nn.MaxPool2d(2) if isinstance(m, models.MaxPool2d) else m
                                 for m in b.features])
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for net in (a, b):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bench_prints_each_figure_as_the_median_of_fresh_processes(monkeypatch, capsys):
    """python -m lowbit.bench runs each benchmark in --processes fresh processes and prints
    each figure's median on standard output, every process's figure on standard error; bad
    arguments are named."""
    from lowbit import bench
    runs = iter([{"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 1.0}, {"a": 9.0, "b": 2.5}])
    monkeypatch.setattr(bench, "_worker", lambda name: next(runs))
    bench.main(["fake_quant"])
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == ["a: 2.000", "b: 2.500"]
    assert "a per process: 1.000 2.000 9.000" in err
    for argv, message in ((["--processes", "0"], "at least 1, got 0"), (["nope"], "'nope'")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err


def test_bench_worker_measures_in_a_process_of_its_own():
    """A worker is a fresh `python -m lowbit.bench --worker NAME` process whose figures
    come back in full."""
    from lowbit import bench
    figures = bench._worker("fake_quant")
    assert list(figures) == ["fake_quant_per_tensor_vs_clone"]
    assert 0 < figures["fake_quant_per_tensor_vs_clone"] < 100


def test_a_nan_image_is_named_as_data_not_as_divergence():
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[5, 0, 2, 2] = float("nan")
    loader = data.ArrayLoader(x, torch.arange(64) % 10, 32)
    net = models.build_model("mlp", (1, 8, 8))
    with pytest.raises(ValueError, match=r"holds 1 non-finite input value\(s\) \(NaN or inf\): check the data"):
        train.fit(net, loader, 1, torch.optim.SGD(net.parameters(), lr=0.1), progress=False)


def test_labels_the_model_cannot_give_are_named():
    with pytest.raises(ValueError, match=r"it gives 10 outputs per example .* go from 0 to 11; a label must be 0..9"):
        train.loss_and_correct(torch.randn(12, 10), torch.arange(12))


def test_not_training_names_modules_that_cannot_change_a_trained_model():
    """cache.NOT_TRAINING leaves modules out of the model cache's key, so it must stay true:
    each entry is a module of the package, and no module that trains imports one of them
    except ``cache`` itself (which only stores), so editing a plot or a page cannot change a
    trained model that the cache hands back."""
    import ast
    from pathlib import Path
    root = Path(cache.__file__).parent
    assert all((root / name).is_file() for name in cache.NOT_TRAINING), cache.NOT_TRAINING
    outside = {name[:-3] for name in cache.NOT_TRAINING} - {"cache"}
    bad = []
    for f in sorted(root.rglob("*.py")):
        if f.parent == root and f.name in cache.NOT_TRAINING:
            continue
        package = f.relative_to(root).parts[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                targets = [(*base, *node.module.split("."))] if node.module else \
                    [(*base, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowbit."):
                targets = [tuple(node.module.split(".")[1:])]
            else:
                continue
            bad += [f"{f.relative_to(root)} imports {'.'.join(t)}" for t in targets
                    if len(t) == 1 and t[0] in outside]
    assert not bad, f"a training module imports one the model cache ignores: {bad}"


def _package_modules() -> dict[str, "Path"]:
    """The package's modules by dotted name (``lowbit.fqt.layers``), each with its file."""
    from pathlib import Path
    root = Path(cache.__file__).parent
    found = {}
    for f in sorted(root.rglob("*.py")):
        parts = ("lowbit", *f.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def test_no_module_uses_another_modules_private_names():
    """A name that starts with one underscore belongs to its module: no other module of the
    package imports it (``from .quant import _x``) or reaches it through the module
    (``recipes._x``). What several modules share is public in the module that owns it."""
    import ast
    modules, bad = _package_modules(), []
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        owners = {}  # local names bound to a module of the package
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("lowbit"):
                continue
            for a in node.names:
                if f"{source}.{a.name}" in modules:
                    owners[a.asname or a.name] = f"{source}.{a.name}"
                elif a.name[:1] == "_" and a.name[:2] != "__" and source != name:
                    bad.append(f"{name} imports {source}.{a.name}")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in owners and node.attr[:1] == "_" \
                    and node.attr[:2] != "__" and owners[node.value.id] != name:
                bad.append(f"{name} uses {owners[node.value.id]}.{node.attr}")
    assert not bad, f"private names used outside their module: {bad}"


def test_no_function_of_the_package_is_longer_than_60_lines():
    """Each function does one job that a reader takes in at once: none of the package's
    functions or methods (docstring included) runs past 60 lines."""
    import ast
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, f in _package_modules().items()
            for node in ast.walk(ast.parse(f.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long
