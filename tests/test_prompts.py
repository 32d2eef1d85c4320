import json
import re
import string

import pytest

from reca_hf import load_prompts
from reca_hf.prompts import PromptSampler


def normalise(prompt):
    prompt = prompt.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(prompt.split())


def test_default_templates_are_many_distinct_and_ascii():
    prompts = load_prompts()
    assert len(prompts) >= 360
    assert len({normalise(p) for p in prompts}) == len(prompts)
    assert all(p.isascii() and p == p.strip() for p in prompts)


def test_default_templates_spread_over_length_bands_and_forms():
    prompts = load_prompts()
    words = [len(p.split()) for p in prompts]
    for band in ([w for w in words if w <= 8], [w for w in words if 9 <= w <= 20], [w for w in words if w > 20]):
        assert len(band) >= 0.15 * len(prompts)
    assert sum(p.endswith("?") for p in prompts) >= 30
    checklists = [p.lower() for p in prompts if re.search(r"\w:\s", p)]
    assert len(checklists) >= 30
    for aspect in ("quality", "style", "colo", "shape", "size", "texture", "count", "text", "layout", "background"):
        assert any(aspect in c for c in checklists), aspect


def test_user_files_one_per_line_or_json(tmp_path):
    lines = tmp_path / "mine.txt"
    lines.write_text("# my prompts\nDescribe it.\n\n  What is shown?  \n")
    assert load_prompts(lines) == ["Describe it.", "What is shown?"]
    listed = tmp_path / "mine.json"
    listed.write_text(json.dumps(["One.", "Two."]))
    assert load_prompts(listed) == ["One.", "Two."]


@pytest.mark.parametrize("content, suffix", [("", ".txt"), ('{"a": 1}', ".json")])
def test_bad_prompt_files_are_refused(tmp_path, content, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match="prompt_templates"):
        load_prompts(path)
    with pytest.raises(FileNotFoundError, match="prompt_templates"):
        load_prompts(tmp_path / "missing.txt")


def test_draws_depend_only_on_seed_epoch_and_index():
    prompts = load_prompts()
    a = PromptSampler(prompts, "", 0.1, seed=3)
    b = PromptSampler(prompts, "", 0.1, seed=3)
    assert [a.draw(i, 1) for i in range(50)] == [b.draw(i, 1) for i in reversed(range(50))][::-1]
    assert [a.draw(i, 0) for i in range(50)] != [a.draw(i, 1) for i in range(50)]
    assert len({a.draw(i)[0] for i in range(200)}) > 100
