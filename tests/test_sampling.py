"""`reca sample` (GenEval, DPG-Bench and folder layouts, resumable) and `reca reconstruct` on tiny saved models."""

import json

import pytest
import torch
from PIL import Image

from reca_hf import RecATrainer
from reca_hf.adapters import get_adapter
from reca_hf.cli import main
from reca_hf.data import synthetic_shapes
from reca_hf.loading import load_for_generation
from reca_hf.sampling import read_prompts
from reca_hf.testing import tiny_umm

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a red circle"},
    {"tag": "two_object", "include": [{"class": "square", "count": 2}], "prompt": "two blue squares"},
    {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "green"}], "prompt": "a green triangle"},
]


@pytest.fixture
def saved_janus(tmp_path):
    model, processor = tiny_umm("janus")
    model.save_pretrained(tmp_path / "janus")
    processor.save_pretrained(tmp_path / "janus")
    return tmp_path / "janus"


def _geneval_prompts(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES))
    return path


def _dpg_prompts(tmp_path):
    folder = tmp_path / "dpg_prompts"
    folder.mkdir(exist_ok=True)
    for name, text in (("a_red_circle", "a red circle"), ("12", "a blue square on the left")):
        (folder / f"{name}.txt").write_text(text + "\n")
    return folder


def test_geneval_layout_is_what_its_evaluator_reads(saved_janus, tmp_path, capsys):
    out = tmp_path / "geneval"
    main(["sample", str(saved_janus), "--prompts", str(_geneval_prompts(tmp_path)), "--layout", "geneval",
          "--out", str(out), "--batch_size", "2"])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002"]
    for index, line in enumerate(GENEVAL_LINES):
        folder = out / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == line  # the line, as the evaluator loads it
        samples = sorted(p.name for p in (folder / "samples").iterdir())
        assert samples == ["00000.png", "00001.png", "00002.png", "00003.png"]
        assert Image.open(folder / "samples" / "00000.png").size == (32, 32)
        assert Image.open(folder / "grid.png").size == (4 * 32, 32)
    assert "12 images for 3 prompts" in capsys.readouterr().out


def test_dpgbench_layout_is_one_2x2_grid_per_item(saved_janus, tmp_path):
    out = tmp_path / "dpg"
    main(["sample", str(saved_janus), "--prompts", str(_dpg_prompts(tmp_path)), "--layout", "dpgbench",
          "--out", str(out)])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["12.png", "a_red_circle.png"]  # nothing else: all are scored
    grid = Image.open(out / "12.png")
    assert grid.size == (64, 64)
    quarters = [
        grid.crop(box).tobytes() for box in ((0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 64), (32, 32, 64, 64))
    ]
    assert len(set(quarters)) == 4  # four different samples, each at the resolution the evaluator crops
    with pytest.raises(SystemExit, match="2x2 grid"):
        main(["sample", str(saved_janus), "--prompts", str(_dpg_prompts(tmp_path)), "--layout", "dpgbench",
              "--out", str(out), "--num_images_per_prompt", "2"])  # fmt: skip


def test_folder_layout_resumes_with_the_same_images(saved_janus, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green triangle\n")
    out = tmp_path / "folder"
    command = ["sample", str(saved_janus), "--prompts", str(prompts), "--out", str(out), "--num_images_per_prompt", "2"]
    main(command)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png", "00002_0.png", "00002_1.png",
                     "prompts.jsonl"]  # fmt: skip
    index = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert index[1] == {"prompt": "a blue square", "files": ["00001_0.png", "00001_1.png"]}
    first = {name: (out / name).read_bytes() for name in names if name.endswith(".png")}
    (out / "00001_1.png").unlink()
    capsys.readouterr()
    main(command)
    assert "2 images for 1 prompts (2 of 3 already done)" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in first} == first  # resumed: the same images


def test_sample_refuses_settings_the_sampler_does_not_take(saved_janus, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit, match="num_inference_steps.*takes do_sample, temperature"):
        main(["sample", str(saved_janus), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
              "--sampler", '{"num_inference_steps": 3}'])  # fmt: skip
    with pytest.raises(SystemExit, match="evaluation_metadata.jsonl"):  # GenEval's prompt file is named
        main(["sample", str(saved_janus), "--prompts", str(prompts), "--layout", "geneval", "--out", str(tmp_path)])


def test_read_prompts_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a red circle"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*prompt"):
        read_prompts(path, "folder")


def test_reconstruct_writes_one_image_per_file(saved_janus, tmp_path, capsys):
    shapes = synthetic_shapes(2, size=32, seed=3)["image"]
    files = []
    for i, image in enumerate(shapes):
        files.append(tmp_path / f"shape{i}.png")
        image.save(files[-1])
    out = tmp_path / "rec"
    main(["reconstruct", str(saved_janus), *map(str, files), "--out", str(out), "--guidance_scale", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["shape0.png", "shape1.png"]
    assert Image.open(out / "shape0.png").size == (32, 32)
    assert "2 reconstructions" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_a_lora_run_folder_loads_with_its_adapter_applied(make_args, shapes, tmp_path):
    model, processor = tiny_umm("janus")
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    trainer = RecATrainer(str(tmp_path / "base"), args=make_args(use_peft=True, max_steps=2, learning_rate=5e-2),
                          train_dataset=shapes)  # fmt: skip
    trainer.train()
    trainer.save_model()
    loaded, _, adapter = load_for_generation(str(tmp_path / "run"))
    trained = {name: p for name, p in trainer.model.named_parameters() if ".lora_B" in name}
    applied = {name: p for name, p in loaded.named_parameters() if ".lora_B" in name}
    assert trained.keys() == applied.keys() and any(p.abs().sum() > 0 for p in applied.values())
    assert all(torch.equal(applied[name].cpu(), trained[name].detach().cpu()) for name in trained)
    expected = get_adapter(trainer.model, processor).text_to_image(["a red circle"], seed=0, guidance_scale=1.0)
    assert adapter.text_to_image(["a red circle"], seed=0, guidance_scale=1.0)[0].tobytes() == expected[0].tobytes()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    main(["sample", str(tmp_path / "run"), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
          "--guidance_scale", "1"])  # fmt: skip
    assert (tmp_path / "o" / "00000_0.png").read_bytes() != b""


def test_a_hub_id_loads_for_generation(hub, saved_janus, tmp_path):
    from huggingface_hub import create_repo, upload_folder

    create_repo("loopback-user/tiny-janus", exist_ok=True)
    upload_folder(folder_path=str(saved_janus), repo_id="loopback-user/tiny-janus")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    main(["sample", "loopback-user/tiny-janus", "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    assert (tmp_path / "o" / "00000_0.png").is_file()


def test_read_prompts_reads_every_format(tmp_path):
    folder = _dpg_prompts(tmp_path)
    assert [(p.name, p.text) for p in read_prompts(folder, "dpgbench")] == [
        ("12", "a blue square on the left"),
        ("a_red_circle", "a red circle"),
    ]
    assert [p.metadata for p in read_prompts(_geneval_prompts(tmp_path), "geneval")] == GENEVAL_LINES


def test_reconstruct_of_a_run_uses_its_views_seed_and_grid_settings(make_args, shapes, tmp_path, monkeypatch):
    """`reca reconstruct RUN` generates as the run's grid did: its seed, its reconstruction_kwargs and its views
    (fits, condition source); flags still win, and --side_by_side puts the input beside its reconstruction."""
    model, processor = tiny_umm("janus")
    args = make_args(max_steps=1, seed=7, reconstruction_kwargs={"guidance_scale": 1.5, "do_sample": False},
                     target_fit="stretch", num_reconstruction_images=0, collapse_action="off")  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train()
    trainer.save_model()
    image = tmp_path / "shape.png"
    shapes[0]["image"].save(image)
    calls = []
    adapter_class = type(trainer.adapter)
    original = adapter_class.reconstruct

    def recording(self, images, **kwargs):
        calls.append(kwargs)
        return original(self, images, **kwargs)

    monkeypatch.setattr(adapter_class, "reconstruct", recording)
    main(["reconstruct", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "rec"), "--side-by-side"])
    (call,) = calls
    assert call["seed"] == 7 and call["guidance_scale"] == 1.5 and call["do_sample"] is False
    assert call["views"].target_fit == "stretch" and call["views"] == trainer.views
    assert Image.open(tmp_path / "rec" / "shape.png").size == (64, 32)  # input | reconstruction
    main(["reconstruct", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "rec2"), "--seed", "3",
          "--guidance_scale", "1"])  # fmt: skip
    assert calls[-1]["seed"] == 3 and calls[-1]["guidance_scale"] == 1.0
