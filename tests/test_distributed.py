"""Multi-process training: the shipped accelerate configs, `reca train --accelerate_config`, and 2-process CPU runs
(gloo) checked against a single process training on the same global batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from reca_hf import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "janus" / "tiny_demo.yaml")
# A few steps at a constant learning rate, so that the weights move between the compared logs.
SHORT_RUN = ["--max_steps", "4", "--logging_steps", "1", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
             "--save_strategy", "no", "--num_reconstruction_images", "0"]  # fmt: skip
# Relative tolerances, 2 processes x 4 vs 1 process x 8 (4 steps of tiny_demo.yaml), measured here: every logged
# value agrees to float noise (reconstruction_loss 8.6e-8, loss 8.1e-8, image_to_text_loss 7.5e-8, grad_norm 2.1e-7).
# Before the image-to-text loss was normalised by the global answer-token count (RecATrainer._caption_token_share),
# each process averaged over its own caption tokens and the gaps were 4.7e-5 (image_to_text_loss), 2.5e-5 (loss),
# 6.0e-7 (reconstruction_loss) and 1.8e-2 (grad_norm).
RTOL = {"reconstruction_loss": 1e-6, "loss": 1e-6, "image_to_text_loss": 1e-6, "grad_norm": 1e-5}
SHIPPED = {"multi_gpu": "MULTI_GPU", "multi_cpu": "MULTI_GPU", "fsdp2": "FSDP", "fsdp2_bagel": "FSDP",
           "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_accelerate_configs_load_and_leave_precision_to_the_recipe(name):
    config = load_config_from_file(str(cli.accelerate_config_path(name)))
    assert config.distributed_type == SHIPPED[name]
    assert config.mixed_precision == "no"  # bf16 / fp16 come from the recipe, not from the launch
    assert config.use_cpu == (name == "multi_cpu")


def test_the_bagel_fsdp2_config_wraps_classes_the_model_has():
    """The wrap units are classes BagelModel has (a renamed class would make accelerate fail at launch), named
    explicitly: the default (the model's ``_no_split_modules``, which transformers also collects from the diffusers
    VAE) would wrap every VAE ResNet block as well."""
    from reca_hf.models.bagel import BagelModel
    from reca_hf.models.bagel.tiny import build_tiny_bagel

    config = load_config_from_file(str(cli.accelerate_config_path("fsdp2_bagel"))).fsdp_config
    assert config["fsdp_version"] == 2 and config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    wrapped = set(config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    model, _ = build_tiny_bagel()
    assert isinstance(model, BagelModel)
    assert wrapped == {"BagelMoTDecoderLayer", "SiglipEncoderLayer"}
    assert wrapped <= {type(m).__name__ for m in model.modules()} and wrapped < set(model._no_split_modules)


def test_accelerate_config_is_a_shipped_name_or_a_path(tmp_path):
    assert cli.accelerate_config_path("zero3") == cli.ACCELERATE_CONFIGS / "zero3.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert cli.accelerate_config_path(str(own)) == own
    with pytest.raises(SystemExit, match=r"'zero9' is neither a file nor a config shipped.*multi_cpu, multi_gpu"):
        cli.accelerate_config_path("zero9")


def test_launch_flags_go_to_accelerate_and_the_rest_to_the_recipe():
    args = ["--accelerate_config", "multi_cpu", "--num_processes", "2", "--max_steps", "3", "--main_process_port=0",
            "--gradient_accumulation_steps", "2", "--cpu", "--output_dir", "out"]  # fmt: skip
    name, launch, overrides = cli.split_launch_args(args)
    assert name == "multi_cpu"
    assert launch == ["--num_processes", "2", "--main_process_port=0", "--cpu"]
    # --gradient_accumulation_steps is also an accelerate launch flag: the recipe field wins, as in trl
    assert overrides == ["--max_steps", "3", "--gradient_accumulation_steps", "2", "--output_dir", "out"]
    with pytest.raises(SystemExit, match="needs a value"):
        cli.split_launch_args(["--accelerate_config"])


def test_train_relaunches_itself_through_accelerate_launch(monkeypatch):
    launched = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", launched.append)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    cli.main(["train", RECIPE, "--accelerate_config", "multi_cpu", "--num_processes", "2", "--max_steps", "3"])
    (args,) = launched
    assert Path(args.config_file) == cli.ACCELERATE_CONFIGS / "multi_cpu.yaml"
    assert args.num_processes == 2 and args.module
    assert [args.training_script, *args.training_script_args] == ["reca_hf.cli", "train", RECIPE, "--max_steps", "3"]
    assert os.environ["ACCELERATE_USE_CPU"] == "true"  # torchrun's launcher does not pass use_cpu on itself


def test_recipe_errors_stop_the_launch_before_any_process_starts(monkeypatch):
    monkeypatch.setattr("accelerate.commands.launch.launch_command", lambda args: pytest.fail("launched"))
    with pytest.raises(SystemExit, match="max_stepz"):
        cli.main(["train", RECIPE, "--accelerate_config", "multi_cpu", "--max_stepz", "3"])


def test_fsdp_on_cpu_processes_is_refused_before_launching(monkeypatch):
    monkeypatch.setattr("accelerate.commands.launch.launch_command", lambda args: pytest.fail("launched"))
    with pytest.raises(SystemExit, match="asks for FSDP on CPU processes.*--accelerate_config multi_cpu"):
        cli.main(["train", RECIPE, "--accelerate_config", "fsdp2", "--use_cpu", "true"])


def test_processes_that_would_each_train_alone_are_stopped(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1, distributed_type="NO"), is_fsdp_enabled=False)
    with pytest.raises(SystemExit, match=r"2 processes were launched.*--use_cpu true"):
        cli._check_processes_train_together(alone)
    together = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2), is_fsdp_enabled=False)
    cli._check_processes_train_together(together)


# ---- real 2-process runs (gloo on the CPU) ----


def _run(tmp_path: Path, command: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``command`` with this checkout's reca_hf and one thread per process (2 cores in CI)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    environment.update(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout)
    return run


def _reca(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return _run(tmp_path, [sys.executable, "-m", "reca_hf.cli", *args], **env)


def _logged(output_dir: Path) -> list[dict[str, float]]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    names = ("loss", "reconstruction_loss", "image_to_text_loss", "grad_norm")
    return [{name: log[name] for name in names} for log in history if "reconstruction_loss" in log]


def _card_samples(output_dir: Path) -> list[int]:
    mix = json.loads((output_dir / "reca_run.json").read_text())["settings"]["task mix"]
    return [int(n.replace(",", "")) for n in re.findall(r"\(([\d,]+) samples\)", mix)]


def _assert_same_training(two_processes: Path, one_process: Path) -> None:
    many, one = _logged(two_processes), _logged(one_process)
    assert len(many) == len(one) == 4
    for step, (a, b) in enumerate(zip(many, one), start=1):
        for name, rtol in RTOL.items():
            assert a[name] == pytest.approx(b[name], rel=rtol), f"{name} at step {step}"
    assert many[-1]["loss"] != pytest.approx(many[0]["loss"], rel=1e-3)  # the weights did move
    # The card counts every process's samples: 4 steps x 8 samples, split as in the single-process run.
    assert _card_samples(two_processes) == _card_samples(one_process)
    assert sum(_card_samples(two_processes)) == 32


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """The reference: one process, a batch of 8 (the global batch of 2 processes x 4)."""
    folder = tmp_path_factory.mktemp("single")
    run = _reca(folder, "train", RECIPE, *SHORT_RUN, "--per_device_train_batch_size", "8", "--output_dir", "out")
    assert run.returncode == 0, run.stderr[-3000:]
    return folder / "out"


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path, single_process):
    ddp = _reca(tmp_path, "train", RECIPE, "--accelerate_config", "multi_cpu", "--num_processes", "2",
                "--main_process_port", "0", *SHORT_RUN, "--per_device_train_batch_size", "4", "--output_dir", "ddp")  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes" not in ddp.stderr  # they formed one run (not two runs of one)
    _assert_same_training(tmp_path / "ddp", single_process)


@pytest.mark.slow
def test_two_process_fsdp_on_cpu(tmp_path, single_process):
    """FSDP needs an accelerator with accelerate 1.15: its AcceleratorState enables the FSDP plugin only for accelerator
    process groups (MULTI_GPU, MULTI_XPU, ...), so CPU processes given an FSDP config silently train as plain DDP.
    reca train refuses that rather than claim FSDP; should a later accelerate shard on CPUs, this test runs FSDP.
    torch itself (2.13) shards on CPUs with gloo: the sharded probe test below uses fully_shard directly."""
    config = tmp_path / "fsdp2_cpu.yaml"
    config.write_text((cli.ACCELERATE_CONFIGS / "fsdp2.yaml").read_text().replace("use_cpu: false", "use_cpu: true"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               "2", "--main_process_port", "0", "-m", "reca_hf.cli", "train", RECIPE, *SHORT_RUN,
               "--per_device_train_batch_size", "4", "--output_dir", "fsdp"]  # fmt: skip
    run = _run(tmp_path, command, ACCELERATE_USE_CPU="true")
    refusal = re.search(r"reca train: FSDP was asked for, but accelerate set up \S+", run.stdout + run.stderr)
    if refusal:
        assert run.returncode != 0
        pytest.skip(f"FSDP does not run on CPU processes with this accelerate: {refusal.group(0)}")
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_training(tmp_path / "fsdp", single_process)


# ---- the collapse detector and the grid on every rank ----

LAUNCH_TIMEOUT = 240  # a hang in a collective fails the test instead of stalling CI


@pytest.mark.slow
def test_two_process_deepspeed_zero2_on_cpu(tmp_path):
    """The shipped zero2 config on 2 CPU processes (DeepSpeed's CPU accelerator, gloo) trains as one process on the
    same global batch does, with the optimizer states sharded one file per rank. accelerate 1.16 finds no process
    group backend on a machine without an accelerator (each process would train alone) unless transformers'
    ddp_backend names gloo; use_cpu would drop DeepSpeed altogether. Reconstruction only: a micro-batch of one task
    leaves the other task's parameters without a gradient, and ZeRO-2's bucketed reduction then differs between
    ranks (gloo: "Received data size doesn't match expected size")."""
    pytest.importorskip("deepspeed")
    run_args = [RECIPE, "--max_steps", "4", "--logging_steps", "1", "--warmup_steps", "0", "--lr_scheduler_type",
                "constant", "--num_reconstruction_images", "0", "--task_ratios",
                '{"reconstruction": 1, "image_to_text": 0, "text_to_image": 0}']  # fmt: skip
    single = _reca(tmp_path, "train", *run_args, "--save_strategy", "no", "--per_device_train_batch_size", "8",
                   "--output_dir", "single")  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(cli.accelerate_config_path("zero2")), "--num_processes", "2", "--main_process_port", "0", "-m",
               "reca_hf.cli", "train", *run_args, "--ddp_backend", "gloo", "--save_strategy", "steps", "--save_steps",
               "4", "--per_device_train_batch_size", "4", "--output_dir", "zero2"]  # fmt: skip
    run = _run(tmp_path, command, timeout=LAUNCH_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    states = tmp_path / "zero2" / "checkpoint-4" / "global_step4"
    assert sorted(p.name for p in states.glob("*optim_states.pt")) == [
        f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)
    ]
    history = {
        name: [log for log in json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
               if "grad_norm" in log]
        for name in ("zero2", "single")
    }  # fmt: skip
    assert len(history["zero2"]) == len(history["single"]) == 4
    for a, b in zip(history["zero2"], history["single"]):
        for name in ("loss", "reconstruction_loss", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=RTOL[name]), f"{name} at step {a['step']}"


@pytest.mark.slow
def test_the_detector_fires_and_every_rank_stops_together_in_a_two_process_run(tmp_path):
    """Plain DDP (rank 0 probes, every rank acts on its reading) and the sharded path (every rank probes through
    RecATrainer.sharded_forward, which FSDP and DeepSpeed runs use): the detector's real loss probe runs, fires at
    its first probe, its readings are logged once, and both processes stop at that step without hanging."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(cli.accelerate_config_path("multi_cpu")), "--num_processes", "2", "--main_process_port", "0",
               str(ROOT / "tests" / "ddp_detector.py"), str(tmp_path), "rank0", "every_rank"]  # fmt: skip
    run = _run(tmp_path, command, ACCELERATE_USE_CPU="true", timeout=LAUNCH_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("RecA collapse detected at step 2") == 2  # once per run: rank 0 says it
    for mode, own_probes in (("rank0", [1, 0]), ("every_rank", [1, 1])):
        ranks = [json.loads((tmp_path / f"{mode}{rank}.json").read_text()) for rank in (0, 1)]
        assert [r["processes"] for r in ranks] == [2, 2]
        assert [r["own_probes"] for r in ranks] == own_probes, mode
        assert [(r["fired_at_step"], r["global_step"]) for r in ranks] == [(2, 2), (2, 2)], mode
        assert ranks[0]["history"] == ranks[1]["history"]  # one reading on both ranks
        (logged,) = ranks[0]["logged"]  # the probe's readings ride on one regular log
        assert logged["step"] == 2 and {"collapse_score", "condition_gain", "swap_own_loss", "swap_other_loss"} <= set(logged)


@pytest.mark.slow
def test_the_probes_and_the_grid_run_on_an_fsdp2_sharded_model_on_every_rank(tmp_path):
    """FSDP2 (fully_shard) works on CPU processes with gloo in torch 2.13 (accelerate only refuses to set it up on
    CPUs): on a model sharded as accelerate's fsdp2 config shards it, the token and loss probes and the grid's
    generation read exactly what the unsharded model reads, the parameters are sharded again afterwards, and a
    training step still gives the unsharded loss and gradients. Under FSDP1 the probes read the same too."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "sharded_probe.py"), str(tmp_path), "janus", "flow"]  # fmt: skip
    run = _run(tmp_path, command, timeout=LAUNCH_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    fsdp1 = ranks[0].pop("fsdp1")  # FSDP1: the probes (the grid is off under FSDP1)
    assert all(result["sharded"] == result["whole"] for result in fsdp1.values()) and set(fsdp1) == {"janus", "flow"}
    for arch, result in ranks[0].items():
        assert result["sharded"] == result["whole"], arch
        assert result["left_whole"] == [], arch
        assert result["losses"][1] == pytest.approx(result["losses"][0], rel=1e-6) and result["same_gradients"], arch
    assert set(ranks[0]["janus"]["sharded"]) == {"loss_probe", "token_probe", "grid", "text_to_image"}


@pytest.mark.slow
def test_a_bagel_step_sharded_with_fsdp2_on_two_processes_is_the_global_token_weighted_step(tmp_path):
    """The tiny BAGEL sharded with FSDP2 over 2 gloo processes on the shipped fsdp2_bagel wrap units, each process a
    micro-batch of two images of other aspect ratios (104 and 64 VAE tokens): the trainer's loss, averaged over the
    processes, and the gradients FSDP2 reduces equal one process's token-weighted mean over all four images (the
    authors' global token count; without it, measured: loss 1.1858 against 1.1776, gradients 57% apart). The collapse
    probe and the grid's reconstructions read the same whole and sharded, on every rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "sharded_bagel.py"), str(tmp_path)]  # fmt: skip
    run = _run(tmp_path, command, timeout=LAUNCH_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    result = ranks[0]
    assert result["tokens"][0] != result["tokens"][1]
    assert result["losses"][1] == pytest.approx(result["losses"][0], rel=1e-6)
    assert result["same_gradient_names"] and result["worst_gradient_difference"] < 1e-5
    assert result["sharded"] == result["whole"] and set(result["whole"]) == {"loss_probe", "grid"}
    assert result["left_whole"] == []


def test_a_run_of_several_tasks_lets_ddp_find_unused_parameters(make_args, shapes):
    """A micro-batch may hold one task's rows only; DDP then needs to look for the other tasks' unused parameters
    (transformers leaves that off under gradient checkpointing). A user's explicit setting stays."""
    from reca_hf import RecATrainer
    from reca_hf.testing import tiny_umm

    for setting, expected in ((None, True), (False, False)):
        model, processor = tiny_umm("harmon")
        args = make_args(task_ratios={"reconstruction": 1, "image_to_text": 1}, ddp_find_unused_parameters=setting,
                         collapse_action="off")  # fmt: skip
        trainer = RecATrainer(model, args=args, train_dataset=shapes, i2t_dataset=shapes, processing_class=processor)
        assert trainer.args.ddp_find_unused_parameters is expected
    model, processor = tiny_umm("harmon")
    alone = RecATrainer(model, args=make_args(collapse_action="off"), train_dataset=shapes, processing_class=processor)
    assert alone.args.ddp_find_unused_parameters is None  # one task: transformers decides


@pytest.mark.slow
def test_two_process_ddp_trains_micro_batches_of_one_task(tmp_path):
    """Harmon's tiny demo on 2 processes, one sample per micro-batch (so each holds one task: an image-to-text one
    leaves the MAR decoder and diffusion head without a gradient) under activation checkpointing."""
    run = _reca(tmp_path, "train", str(ROOT / "recipes" / "harmon" / "tiny_demo.yaml"), "--accelerate_config",
                "multi_cpu", "--num_processes", "2", "--main_process_port", "0", *SHORT_RUN, "--eval_strategy", "no",
                "--per_device_train_batch_size", "1", "--activation_checkpointing", "true",
                "--activation_checkpointing_kwargs", '{"use_reentrant": false}', "--output_dir", "out")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [log["step"] for log in history if "loss" in log] == [1, 2, 3, 4]
