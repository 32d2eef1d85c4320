"""The README's "your own images" step runs as written: its Python block and its `reca validate` line, on a
folder of PNGs and a captioned image folder made here."""

import json
import re
import shlex
from pathlib import Path

import pytest

from reca_hf.cli import main
from reca_hf.data import synthetic_shapes

ROOT = Path(__file__).parents[1]


def _own_images_step() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("**Your own images.**") : readme.index("**A real checkpoint.**")]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.fixture
def own_folders(tmp_path, monkeypatch):
    """`./my_images` (4 PNGs) and `./my_captioned` (4 PNGs with a metadata.jsonl of captions) in the working dir."""
    images, captioned = tmp_path / "my_images", tmp_path / "my_captioned"
    images.mkdir(), captioned.mkdir()
    for i, row in enumerate(synthetic_shapes(4, size=32, seed=0)):
        row["image"].save(images / f"{i}.png")
    lines = []
    for i, row in enumerate(synthetic_shapes(4, size=32, seed=1)):
        row["image"].save(captioned / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "caption": row["caption"]}))
    (captioned / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_own_images_python_block_runs_as_written(own_folders):
    (code,) = _blocks(_own_images_step(), "python")
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["images"].column_names == ["image"] and namespace["images"].num_rows == 4
    assert namespace["captioned"].column_names == ["image", "caption"] and namespace["captioned"].num_rows == 4


def test_own_images_validate_line_runs_as_written(own_folders, capsys):
    (commands,) = _blocks(_own_images_step(), "sh")
    line = next(line for line in commands.splitlines() if line.startswith("reca validate"))
    argv = shlex.split(line)[1:]
    argv[1] = str(ROOT / argv[1])  # the recipe, named from the repository root
    main(argv)
    assert "OK" in capsys.readouterr().out
    (own_folders / "my_images" / "cut.png").write_bytes((own_folders / "my_images" / "0.png").read_bytes()[:60])
    with pytest.raises(SystemExit):  # the line does read the folder: a truncated file there is named
        main(argv)
    assert "cut.png" in capsys.readouterr().err


@pytest.mark.slow
def test_python_example_trains_and_saves_a_model(tmp_path, monkeypatch):
    """The README's "In Python" block, as written: a saved folder that `from_pretrained` loads, with the card, the
    run record and the reconstruction grid."""
    from PIL import Image

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**In Python.**") :]
    code = _blocks(section, "python")[0]
    assert "trainer.save_model()" in code
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    out = tmp_path / "outputs" / "python-demo"
    for name in ("model.safetensors", "config.json", "README.md", "reconstructions.png", "reca_run.json"):
        assert (out / name).is_file(), name
    from transformers import AutoModel

    assert AutoModel.from_pretrained(out).config.model_type == "janus"
    assert Image.open(out / "reconstructions.png").size[0] > 0
    run = json.loads((out / "reca_run.json").read_text())
    assert run["settings"]["task mix"].startswith("reconstruction 50%")  # the image-to-text half ran too
