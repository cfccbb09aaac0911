"""The evaluate entry point and the in-training metrics callback on tiny digits runs (offline: digits-cnn)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch_fidelity

from helpers import FAST, compose_config, entry_point_env
from lightning_diffusion.lightning.checkpoints import save_run_config
from lightning_diffusion.lightning.data import DigitsDataModule
from lightning_diffusion.lightning.evaluation import evaluate, fidelity_options
from lightning_diffusion.lightning.artifacts import sha256_file
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.train import train
from test_metrics import digits_cnn_weights, save_png_folder

FD = "fd_digits-cnn"

pytestmark = pytest.mark.usefixtures("one_thread")


def eval_overrides(ckpt, tmp_path, *extra) -> list[str]:
    return [f"ckpt_path={ckpt}", "logger=csv", "feature_extractor=digits-cnn",
            f"feature_extractor_weights_path={digits_cnn_weights()}", f"cache_dir={tmp_path / 'cache'}",
            "metrics=[fid,isc,kid]", "fidelity.kid_subset_size=20", "num_samples=40", "batch_size=10", "seeds=[0]",
            "sampler=ddim", "grid.steps=4", *extra]


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A 4-step class-conditional DDPM (T = 50, a narrow U-Net) on the digits, with proxy metrics every 2 steps."""
    run_dir = tmp_path_factory.mktemp("ddpm_run")
    overrides = FAST + ["trainer.max_steps=4", "model.process.T=50", "grid.steps=10", "data.batch_size=16",
                        "network.channels=16", "network.num_res_blocks=1",
                        "callbacks=with_metrics", "callbacks.sample_grid=null", "callbacks.final_samples=null",
                        "callbacks.fidelity.every_n_steps=2", "callbacks.fidelity.num_samples=20",
                        "callbacks.fidelity.batch_size=10", "callbacks.fidelity.steps=3",
                        f"callbacks.fidelity.feature_extractor_weights_path={digits_cnn_weights()}",
                        f"callbacks.fidelity.cache_dir={run_dir / 'cache'}"]
    overrides = [o for o in overrides if not o.startswith(("callbacks.sample_grid.n", "callbacks.final_samples."))]
    train(compose_config(overrides, run_dir))
    return run_dir


def test_callback_logs_proxy_metrics_with_their_protocol(ddpm_run):
    logged = pd.read_csv(ddpm_run / "csv" / "metrics.csv")
    column = f"proxy_n20/{FD}"
    assert column in logged.columns and "proxy_n20/fid" not in logged.columns
    assert sorted(logged.dropna(subset=[column])["step"]) == [2, 4]
    assert (logged[column].dropna() > 0).all()
    saved = json.loads((ddpm_run / "proxy_metrics" / "step0000004.json").read_text())
    protocol = saved["protocol"]
    assert protocol["proxy"] and not protocol["paper_protocol"] and protocol["ema"] is True
    assert protocol["num_samples"] == 20 and protocol["nfe"] == 3 and protocol["reference"]["split"] == "train"
    assert protocol["feature_extractor_weights_sha256"] == sha256_file(digits_cnn_weights())


def test_evaluate_checkpoint_writes_metrics_with_protocol(ddpm_run, tmp_path):
    ckpt = ddpm_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(eval_overrides(ckpt, tmp_path, "seeds=[0,1]", "likelihood.enabled=true",
                                        "likelihood.num_samples=6", "likelihood.batch_size=3",
                                        f"cache_dir={ddpm_run / 'cache'}"), config_name="evaluate")
    result = evaluate(cfg)
    path = Path(result["path"])
    assert path.parent == ddpm_run / "evaluation" and path.name.startswith("ddim-uniform-nfe4-n40-")
    saved = json.loads(path.read_text())
    metrics, protocol = saved["metrics"], saved["protocol"]
    for key in (FD, f"{FD}_min", f"{FD}_max", "kd_digits-cnn_mean", "cs_digits-cnn_mean", "bpd_vlb"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics[f"{FD}_min"] <= metrics[FD] <= metrics[f"{FD}_max"] and 0 < metrics["bpd_vlb"] < 100
    assert set(saved["per_seed"]) == {"0", "1"} and saved["per_seed"]["0"] != saved["per_seed"]["1"]
    assert protocol["num_samples"] == 40 and protocol["seeds"] == [0, 1] and protocol["nfe"] == 4
    assert protocol["sampler"]["_target_"].endswith("ddim") and protocol["grid"]["steps"] == 4
    assert protocol["ema"] is True
    assert protocol["reference"]["split"] == "train" and protocol["reference"]["num_samples"] == 1617
    assert protocol["checkpoint_sha256"] == sha256_file(ckpt) and protocol["likelihood"]["num_samples"] == 6
    assert protocol["backend"].startswith("torch-fidelity") and not protocol["paper_protocol"]
    # the callback's reference statistics, computed once during training, are the ones evaluate reuses
    proxy = json.loads((ddpm_run / "proxy_metrics" / "step0000002.json").read_text())["protocol"]["reference"]
    assert protocol["reference"]["statistics"] == proxy["statistics"]
    # the same seeds give the same numbers; the reference statistics come from the cache the first run wrote
    again = evaluate(compose_config(eval_overrides(ckpt, tmp_path, "seeds=[1]", f"out_dir={tmp_path / 'again'}"),
                                    config_name="evaluate"))
    assert again["metrics"][FD] == pytest.approx(saved["per_seed"]["1"][FD], rel=1e-6)
    clipped = evaluate(compose_config(eval_overrides(ckpt, tmp_path, "seeds=[1]", f"out_dir={tmp_path / 'again'}",
                                                     "transforms=[{_target_:lightning_diffusion.core.transforms.clip_x0,"
                                                     "_partial_:true}]"), config_name="evaluate"))
    recorded = json.loads(Path(clipped["path"]).read_text())["protocol"]["transforms"]
    assert recorded[0]["_target_"].endswith("clip_x0") and clipped["path"] != again["path"]
    logged = pd.read_csv(next((ddpm_run / "csv_evaluate").glob("version_*/metrics.csv")))
    assert f"eval/{FD}" in logged.columns


def test_fewer_samples_than_kid_subset_size_clamp_the_subset_with_a_warning(ddpm_run, tmp_path, caplog):
    """Issue 23, item 14: num_samples < 1000 failed on the default kid_subset_size=1000; now KID's subsets are
    clamped to the samples, warned and recorded in the protocol, and without KID the option is not looked at."""
    ckpt = ddpm_run / "checkpoints" / "last.ckpt"
    overrides = [o for o in eval_overrides(ckpt, tmp_path) if not o.startswith("fidelity.")]
    cfg = compose_config(overrides + ["num_samples=30", "batch_size=15"], config_name="evaluate")
    assert cfg.fidelity.kid_subset_size == 1000 and "kid" in cfg.metrics
    with caplog.at_level("WARNING"):
        result = evaluate(cfg)
    assert "fidelity.kid_subset_size=1000 > 30 samples / 1617 reference images: KID uses subsets of 30" in caplog.text
    assert result["protocol"]["metric_options"]["kid_subset_size"] == 30
    assert math.isfinite(result["metrics"]["kd_digits-cnn_mean"])
    without = compose_config(overrides + ["num_samples=30", "metrics=[fid]"], config_name="evaluate")
    assert fidelity_options(without, 30, 1617)["kid_subset_size"] == 1000


def test_evaluate_image_folder_equals_torch_fidelity(tmp_path):
    """A folder against a folder through the entry point = torch-fidelity's calculate_metrics with digits-cnn."""
    data = DigitsDataModule(seed=0).train_tensor()
    a, b = save_png_folder(data[:60], tmp_path / "a"), save_png_folder(data[60:160].flip(-1), tmp_path / "b")
    cfg = compose_config(["~logger", f"images={a}", f"reference.source={b}", "feature_extractor=digits-cnn",
                          f"feature_extractor_weights_path={digits_cnn_weights()}", "metrics=[fid,isc,kid]",
                          "fidelity.kid_subset_size=30", f"cache_dir={tmp_path / 'cache'}"], config_name="evaluate")
    ours = evaluate(cfg)
    theirs = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), cuda=False, fid=True, isc=True, kid=True,
                                              feature_extractor="digits-cnn", kid_subset_size=30, verbose=False,
                                              feature_extractor_weights_path=str(digits_cnn_weights()), cache=False,
                                              save_cpu_ram=True)
    pairs = {FD: "frechet_inception_distance", "kd_digits-cnn_mean": "kernel_inception_distance_mean",
             "cs_digits-cnn_mean": "inception_score_mean"}
    for ours_key, their_key in pairs.items():
        assert ours["metrics"][ours_key] == pytest.approx(theirs[their_key], rel=1e-4, abs=1e-4), ours_key
    assert Path(ours["path"]) == a / "evaluation-digits-cnn.json" and ours["protocol"]["num_samples"] == 60


def test_pf_ode_bits_per_dim_for_a_continuous_time_model(tmp_path):
    """An (untrained) EDM checkpoint: test-set bits/dim through the PF-ODE, as a metric of the same entry point."""
    run_dir = tmp_path / "edm"
    cfg = compose_config(["model=edm", "data=digits", "network=unet_tiny", "network.channels=8",
                          "network.num_res_blocks=1", "network.channel_mult=[1]", "network.attn_resolutions=[]"],
                         run_dir)
    _, model, _ = build(cfg)
    save_run_config(cfg, run_dir)
    (run_dir / "checkpoints").mkdir()
    torch.save({"state_dict": model.state_dict()}, run_dir / "checkpoints" / "last.ckpt")
    result = evaluate(compose_config(eval_overrides(run_dir / "checkpoints" / "last.ckpt", tmp_path, "metrics=[fid]",
                                                    "num_samples=20", "sampler=euler", "grid.steps=3",
                                                    "likelihood.enabled=true", "likelihood.num_samples=2",
                                                    "likelihood.batch_size=2", "likelihood.rtol=1e-3",
                                                    "likelihood.atol=1e-3"), config_name="evaluate"))
    bpd, protocol = result["metrics"]["bpd_pf_ode"], result["protocol"]
    assert 0 < bpd < 50 and protocol["likelihood"]["levels"] == 17  # the digits' pixel levels, 0..16
    assert protocol["ema"] is False and protocol["nfe"] == 3


def test_reference_statistics_only_and_config_errors(tmp_path):
    base = ["~logger", "feature_extractor=digits-cnn", f"feature_extractor_weights_path={digits_cnn_weights()}",
            f"cache_dir={tmp_path}"]
    result = evaluate(compose_config(base + ["data=digits", "reference.split=val"], config_name="evaluate"))
    assert Path(result["reference"]["statistics"]).is_file() and result["reference"]["num_samples"] == 180
    assert "-val-8x8-digits-cnn-" in result["reference"]["statistics"]
    bad = {"metrics=[fid,fvd]": (ValueError, "choose from"),
           "reference.split=test": (ValueError, "reference.split='test'"),
           f"ckpt_path={tmp_path}/none.ckpt": (FileNotFoundError, "none.ckpt does not exist"),
           f"images={tmp_path}/none": (FileNotFoundError, "not a folder"),
           "reference.source=nowhere": (ValueError, "neither a torch-fidelity data set"),
           "seeds=[]": (ValueError, "seeds=")}
    for override, (error, match) in bad.items():
        with pytest.raises(error, match=match):
            evaluate(compose_config(base + ["data=digits", override], config_name="evaluate"))
    with pytest.raises(FileNotFoundError, match="python -m lightning_diffusion.train_extractor"):
        evaluate(compose_config(["~logger", "data=digits", "feature_extractor=digits-cnn",
                                 f"feature_extractor_weights_path={tmp_path}/absent.pt"], config_name="evaluate"))


@pytest.mark.slow
def test_ddp_evaluation_on_two_processes_equals_one(ddpm_run, tmp_path):
    """devices=2 (Fabric DDP, gloo): the ranks draw disjoint chunks; the gathered metrics equal one process's."""
    ckpt = ddpm_run / "checkpoints" / "last.ckpt"
    overrides = eval_overrides(ckpt, tmp_path, "num_samples=30", "fidelity.kid_subset_size=15", "metrics=[fid,kid]",
                               "seeds=[3]", "likelihood.enabled=true", "likelihood.num_samples=5",
                               "likelihood.batch_size=2")
    single = evaluate(compose_config(overrides + [f"out_dir={tmp_path / 'one'}"], config_name="evaluate"))
    env = entry_point_env(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "lightning_diffusion.evaluate", *overrides, "devices=2", "strategy=ddp",
               f"out_dir={tmp_path / 'two'}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "two" / Path(single["path"]).name).read_text())  # the same name: the same setting
    assert saved["protocol"]["world_size"] == 2 and single["protocol"]["world_size"] == 1
    assert saved["metrics"].keys() == single["metrics"].keys()
    for key, value in single["metrics"].items():
        assert saved["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-8), key


def test_validation_likelihood_during_training_is_evaluates_number(tmp_path):
    """callbacks=with_likelihood logs val_n<K>/bpd_pf_ode for a score-SDE run: the same number `evaluate` gives for
    the checkpoint written at that step (EMA weights, same held-out images, seed and tolerances)."""
    run_dir = tmp_path / "vp"
    options = ["callbacks.likelihood.num_samples=4", "callbacks.likelihood.batch_size=2"]
    metrics = train(compose_config(FAST + ["model=score_sde", "callbacks=with_likelihood", "trainer.max_steps=2",
                                           "callbacks.likelihood.every_n_steps=2", *options,
                                           "network.channels=8", "network.attn_resolutions=[]"], run_dir))
    logged = metrics["val_n4/bpd_pf_ode"]
    result = evaluate(compose_config(eval_overrides(run_dir / "checkpoints" / "last.ckpt", tmp_path, "metrics=[fid]",
                                                    "num_samples=20", "sampler=euler", "grid.steps=2",
                                                    "likelihood.enabled=true", "likelihood.num_samples=4",
                                                    "likelihood.batch_size=2", "likelihood.rtol=1e-3",
                                                    "likelihood.atol=1e-3"), config_name="evaluate"))
    assert 0 < logged < 50 and logged == pytest.approx(result["metrics"]["bpd_pf_ode"], rel=1e-6)
