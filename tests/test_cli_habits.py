"""The `reca` command behaves like `trl` where trl has a habit: --config, both flag spellings, "did you mean",
a --help that imports nothing heavy, and `reca env` for bug reports."""

import subprocess
import sys
from pathlib import Path

import pytest

from reca_hf.cli import OPTIONAL_PACKAGES, main
from reca_hf.recipe import RecipeError, load_recipe

ROOT = Path(__file__).parents[1]
DEMO = str(ROOT / "recipes" / "janus" / "tiny_demo.yaml")


@pytest.mark.parametrize("argv", [["--help"], ["validate", "--help"], ["push", "--help"], ["convert", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    """`reca --help` stays under a second (benchmarks/cli_startup.py measures it) by importing no heavy library."""
    script = (
        "import sys\nfrom reca_hf.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = [name for name in ('torch', 'transformers', 'diffusers', 'trl') if name in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "HEAVY []" in run.stdout, run.stdout + run.stderr


def test_config_flag_names_the_recipe_as_trl_does(capsys):
    main(["validate", "--config", DEMO])
    assert capsys.readouterr().out.startswith(f"{DEMO}: OK")
    main(["validate", f"--config={DEMO}", "--max_steps", "3"])
    assert "OK" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="given twice"):
        main(["train", DEMO, "--config", DEMO])
    with pytest.raises(SystemExit, match="--config needs a recipe"):
        main(["train", "--config"])


def test_both_flag_spellings_everywhere(capsys):
    for command in ("push", "card", "sample", "reconstruct", "validate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for option in {word.rstrip(",") for word in text.split() if word.startswith("--") and len(word) > 3}:
            name = option.split("=")[0].rstrip(",")
            if "-" in name[2:] or "_" in name[2:]:
                twin = "--" + (name[2:].replace("-", "_") if "-" in name[2:] else name[2:].replace("_", "-"))
                assert twin in text, f"reca {command}: {name} without {twin}"
    main(["validate", DEMO, "--check_images"])  # the other spelling of --check-images
    assert "OK" in capsys.readouterr().out


def test_a_near_miss_gets_a_did_you_mean(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: tiny:janus\nlearnng_rate: 0.1\nzzz: 1\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, ["--max-step", "3", "--per_device_train_batch_sise", "2"])
    problems = "\n".join(caught.value.problems)
    assert "learnng_rate: unknown key, not a RecAConfig field; did you mean learning_rate?" in problems
    assert "--max-step: unknown flag, not a RecAConfig field; did you mean --max_steps?" in problems
    assert "did you mean --per_device_train_batch_size?" in problems
    assert "zzz: unknown key, not a RecAConfig field (check the spelling)" in problems  # nothing close: no guess


def test_env_lists_the_optional_packages_under_a_copy_paste_header(capsys):
    main(["env"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("Copy-paste")
    for package in OPTIONAL_PACKAGES:
        assert f"- {package}: " in out
    assert "- torch: " in out and "- devices: " in out
