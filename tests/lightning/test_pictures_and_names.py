"""What a person reads and finds: sample grids, the effective-weighting plot, the tables' overlay, and the names
and device of what `sample` / `evaluate` draw (`lightning.artifacts`, `lightning.plots`, `lightning.sampling`)."""

import matplotlib.figure
import pytest
import torch
from PIL import Image

from helpers import CONF, compose_config
from lightning_diffusion.lightning import sampling
from lightning_diffusion.lightning.artifacts import MIN_GRID_SIDE, save_grid
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.callbacks.weighting_plot import EffectiveWeightingPlot
from lightning_diffusion.lightning.report import plot_weightings


# ---- sample grids --------------------------------------------------------------------------------------------------
def test_a_grid_of_8x8_digits_is_readable_with_one_row_per_class(tmp_path):
    """30 images, 3 per class, labels cycled as sampling draws them, each image a constant = its class: the PNG
    has one row per class in class order, its short side at least MIN_GRID_SIDE, pixels as square blocks."""
    labels = torch.arange(30) % 10
    images = (labels.float() / 9 * 2 - 1)[:, None, None, None].expand(30, 1, 8, 8)
    png = save_grid(images, tmp_path / "grid.png", labels)
    picture = torch.tensor(list(Image.open(png).convert("L").getdata()), dtype=torch.float64)
    width, height = Image.open(png).size
    picture = picture.reshape(height, width)
    assert min(width, height) >= MIN_GRID_SIDE and width < 2 * height  # 10 rows of 3: taller than wide
    factor = height // (10 * 9 + 1)  # make_grid: 8 px per image + 1 px padding, integer upscaling
    assert factor * (10 * 9 + 1) == height and factor * (3 * 9 + 1) == width
    for row in range(10):  # the middle of each image in the row: the class's grey level
        y = factor * (1 + row * 9 + 4)
        values = {round(float(picture[y, factor * (1 + col * 9 + 4)])) for col in range(3)}
        assert values == {round(255 * row / 9)}, (row, values)
    block = picture[factor * 1:factor * 2, factor * 1:factor * 2]  # one source pixel
    assert block.unique().numel() == 1


def test_an_unlabelled_grid_is_square_and_upscaled(tmp_path):
    png = save_grid(torch.rand(16, 3, 8, 8) * 2 - 1, tmp_path / "grid.png")
    width, height = Image.open(png).size
    assert width == height >= MIN_GRID_SIDE


# ---- the effective-weighting plot ----------------------------------------------------------------------------------
@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure saved while the test runs."""
    saved, savefig = [], matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return saved


def test_the_default_ddpm_weighting_plot_is_smooth_labelled_and_named(figures, tmp_path):
    """The main job's plot: DDPM's 1000 point masses drawn as a smooth curve, both axes of both panels labelled,
    the run's weighting, draw and process in the title, density and p x w each of unit area (one scale)."""
    _, model, trainer = build(compose_config(["logger=csv"], tmp_path))
    EffectiveWeightingPlot().on_fit_start(trainer, model)
    assert (tmp_path / "effective_weighting.png").is_file() and (tmp_path / "effective_weighting.csv").is_file()
    (fig,) = figures
    title = fig._suptitle.get_text()
    assert "weighting l_simple" in title and "draw uniform_discrete" in title and "spread over" in title, title
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("logsnr") and "unit area" in ax.get_ylabel()
        (line,) = ax.get_lines()
        x, y = (torch.as_tensor(v, dtype=torch.float64) for v in line.get_data())
        assert abs(float(torch.trapezoid(y, x)) - 1) < 1e-6
        interior = y[y > 1e-4 * y.max()][1:-1]  # the support's two edge cells are partly covered
        assert interior.log().diff(n=2).abs().max() < 0.25, "spikes or a staircase, not a curve"  # atoms: 1.4


def test_tables_overlay_the_weightings_of_their_rows(figures, tmp_path):
    grid = [-1.0, 0.0, 1.0]
    records = []
    for name, density in (("a", [0.2, 0.5, 0.2]), ("b", [0.1, 0.1, 0.8])):
        run = tmp_path / name
        run.mkdir()
        (run / "effective_weighting.csv").write_text("logsnr,density,weight,effective\n" + "".join(
            f"{x},{p},1,{p}\n" for x, p in zip(grid, density)))
        records.append({"keys": {"model.weighting._target_": f"w.{name}"}, "run_dir": run})
    records.append({"keys": {"model.weighting._target_": "w.a"}, "run_dir": tmp_path / "a"})  # a second seed of a
    path = plot_weightings(records, ["model.weighting._target_"], tmp_path / "overlay.png")
    assert path.is_file()
    (fig,) = figures
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["a", "b"]  # one curve per row
    assert plot_weightings([{"keys": {}, "run_dir": tmp_path / "none"}], [], tmp_path / "x.png") is None


# ---- names and device of sampled outputs ---------------------------------------------------------------------------
SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


def chosen(*overrides: str):
    """(sampler, grid) configs as `sample` composes them for these overrides."""
    cfg = compose_config(["ckpt_path=x.ckpt", *overrides], config_name="sample")
    return cfg.sampler, cfg.grid


def test_heun_and_euler_at_the_same_nfe_do_not_collide():
    heun, euler = (sampling.output_stem(*chosen(f"sampler={s}", "grid.steps=10"), 19, n=64, seed=0)
                   for s in ("heun", "euler"))
    assert heun.startswith("heun-karras-nfe19-n64-seed0-") and euler.startswith("euler-karras-nfe19-n64-seed0-")


def test_every_sampler_config_has_its_own_label():
    labels = [sampling.sampler_label(*chosen(f"sampler={s}")) for s in SAMPLERS]
    assert len(set(labels)) == len(SAMPLERS) and not any(label.startswith("generate") for label in labels), labels


def test_a_name_is_the_same_for_the_same_configuration_and_differs_for_any_other():
    base = sampling.output_stem(*chosen("sampler=heun"), 35, n=64, seed=0)
    assert sampling.output_stem(*chosen("sampler=heun"), 35, n=64, seed=0) == base
    others = [sampling.output_stem(*chosen("sampler=heun", "sampler.solver.S_churn=40"), 35, n=64, seed=0),
              sampling.output_stem(*chosen("sampler=heun", "grid.rho=3"), 35, n=64, seed=0),
              sampling.output_stem(*chosen("sampler=heun"), 35, n=64, seed=1),
              sampling.output_stem(*chosen("sampler=heun"), 35, n=64, seed=0, guidance_scale=3.0)]
    assert len({base, *others}) == 5
    assert others[0].startswith("heun-karras-nfe35-")  # the same label, another hash


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_the_best_device(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert sampling.best_device("auto") == expected
    assert sampling.best_device("cuda:1") == "cuda:1" and sampling.best_device("cpu") == "cpu"


def test_sample_asks_for_the_best_device(monkeypatch, tmp_path):
    """`sample` loads the model on best_device(cfg.device): with CUDA reported, on "cuda" (no GPU needed to see it)."""
    from lightning_diffusion import sample as entry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def load_model(path, device):
        asked.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(entry, "load_model", load_model)
    cfg = compose_config([f"ckpt_path={tmp_path}/x.ckpt"], config_name="sample")
    with pytest.raises(RuntimeError, match="stop here"):
        entry.sample(cfg)
    assert asked == ["cuda"]
