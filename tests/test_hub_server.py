"""The loopback Hub server, exercised through the real clients: huggingface_hub, transformers and peft (no mocks)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tests.hub_server import DUMMY_TOKEN, HubServer

REPO = "loopback-user/tiny"


def _folder(root: Path) -> Path:
    """A small folder with nested files."""
    folder = root / "upload"
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "notes.txt").write_text("hello")
    (folder / "sub" / "deep" / "x.txt").write_text("deep")
    return folder


def _calls(hub: HubServer) -> list[tuple[str, str]]:
    """The log as (method, op) pairs, then emptied."""
    calls = [(request.method, request.op) for request in hub.requests]
    hub.clear_requests()
    return calls


def test_fixture_points_the_clients_at_the_loopback_server(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import constants, hf_api, whoami
    from transformers.utils.hub import hf_api as transformers_api

    assert os.environ["HF_ENDPOINT"] == hub.endpoint == constants.ENDPOINT == hf_api.api.endpoint
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub.endpoint + "/")
    assert transformers_api().endpoint == hub.endpoint
    assert constants.HF_HUB_CACHE == str(tmp_path / "hf_home" / "hub")
    assert not constants.HF_HUB_OFFLINE and constants.HF_HUB_DISABLE_TELEMETRY
    assert whoami()["name"] == hub.user
    assert hub.ops == ["whoami"]


def test_create_upload_folder_and_download_back(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError

    api = HfApi()
    assert api.create_repo("tiny", private=True).repo_id == REPO  # no namespace: the token's user
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert hub.repo(REPO).private
    hub.clear_requests()

    folder = _folder(tmp_path)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="first")
    assert _calls(hub) == [("POST", "preupload"), ("POST", "commit")]
    assert info.oid == hub.commits(REPO)[0].oid and hub.commits(REPO)[0].title == "first"

    snapshot = Path(snapshot_download(REPO))
    assert (snapshot / "sub" / "deep" / "x.txt").read_text() == "deep"
    assert (snapshot / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()
    calls = _calls(hub)
    assert calls[:2] == [("GET", "info"), ("GET", "tree")]
    assert calls.count(("GET", "resolve")) == 5  # .gitattributes (initial commit) + 4 files

    path = hf_hub_download(REPO, "sub/notes.txt", cache_dir=tmp_path / "other-cache")
    assert Path(path).read_text() == "hello"
    assert _calls(hub) == [("HEAD", "resolve"), ("GET", "resolve")]

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("loopback-user/absent")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO, token=False)  # private: needs the token


def test_upload_folder_delete_patterns_and_delete_folder(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    folder = _folder(tmp_path)
    hub.add_repo(REPO, {"old.txt": b"stale", "sub/old.txt": b"stale"})
    (folder / "sub" / "notes.txt").unlink()
    api.upload_folder(repo_id=REPO, folder_path=folder, delete_patterns=["*.txt", "sub/*.txt"])
    assert _calls(hub) == [("GET", "tree"), ("POST", "preupload"), ("POST", "commit")]  # deletedFile ops
    assert sorted(hub.files(REPO)) == [".gitattributes", "config.json", "sub/deep/x.txt", "weights.bin"]

    api.upload_folder(repo_id=REPO, folder_path=folder)  # nothing changed: no commit
    assert _calls(hub) == [("POST", "preupload"), ("GET", "info")]

    api.delete_folder("sub", repo_id=REPO)  # a deletedFolder op
    assert sorted(hub.files(REPO)) == [".gitattributes", "config.json", "weights.bin"]
    assert [commit.title for commit in hub.commits(REPO)] == [
        "Delete folder sub with huggingface_hub",
        "Upload folder using huggingface_hub",
        "Add files",
        "initial commit",
    ]


def test_model_card_round_trip(hub: HubServer) -> None:
    from huggingface_hub import ModelCard, ModelCardData, create_repo, model_info, upload_file

    create_repo(REPO)
    data = ModelCardData(license="apache-2.0", library_name="peft", base_model="org/base", tags=["reca"])
    ModelCard.from_template(data, model_id="tiny").push_to_hub(REPO)
    loaded = ModelCard.load(REPO)
    assert loaded.data.license == "apache-2.0" and loaded.data.library_name == "peft"
    assert loaded.data.base_model == "org/base" and loaded.data.tags == ["reca"]
    assert model_info(REPO).card_data.tags == ["reca"]

    with pytest.raises(ValueError, match="Invalid metadata in README.md"):  # the server's validate-yaml says 400
        upload_file(path_or_fileobj=b"---\nlicense: [unclosed\n---\ntext", path_in_repo="README.md", repo_id=REPO)


def test_transformers_push_to_hub_and_from_pretrained(hub: HubServer) -> None:
    from transformers import JanusForConditionalGeneration

    from reca_hf.testing import tiny_umm

    model, _ = tiny_umm("janus")
    model.push_to_hub("tiny")
    # create_repo(exist_ok=True), ModelCard.load (README HEAD: 404), create_commit
    assert hub.ops == ["create", "resolve", "validate_yaml", "preupload", "commit"]
    loaded = JanusForConditionalGeneration.from_pretrained(REPO)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(hub.files(REPO))
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_adapter_push_and_load(hub: HubServer) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    from reca_hf.testing import tiny_umm

    base, _ = tiny_umm("janus")
    config = LoraConfig(r=4, target_modules=["model.generation_head.vision_head"], init_lora_weights=False)
    model = get_peft_model(base, config)
    model.push_to_hub("tiny-lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub.files("loopback-user/tiny-lora"))

    fresh, _ = tiny_umm("janus")
    loaded = PeftModel.from_pretrained(fresh, "loopback-user/tiny-lora")
    head = "base_model.model.model.generation_head.vision_head"
    x = torch.randn(2, model.get_submodule(head).in_features)
    assert not torch.equal(loaded.get_submodule(head)(x), loaded.get_submodule(head).base_layer(x))
    assert torch.allclose(model.get_submodule(head)(x), loaded.get_submodule(head)(x))


def test_commit_500_makes_upload_folder_raise_and_a_retry_succeeds(
    hub: HubServer, tmp_path: Path, instant_retries: list[float]
) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    api.create_repo("tiny")
    folder = _folder(tmp_path)
    # upload_folder (hf_xet installed) sends /commit through http_backoff: 1 try + 5 retries on a 5xx.
    hub.fail_next("commit", status=500, times=6)
    with pytest.raises(HfHubHTTPError) as failed:
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert failed.value.response.status_code == 500
    assert hub.ops.count("commit") == 6 and instant_retries == [1, 2, 4, 8, 8]  # ~23 s without the fixture
    assert set(hub.files(REPO)) == {".gitattributes"}

    api.upload_folder(repo_id=REPO, folder_path=folder)
    assert "config.json" in hub.files(REPO) and hub.pending_faults == 0


def test_a_single_commit_500(hub: HubServer, instant_retries: list[float]) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    api.create_repo("tiny")
    hub.fail_next("commit", status=500)
    with pytest.raises(HfHubHTTPError):  # create_commit (upload_file) does not retry its /commit POST
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    hub.fail_next("commit", status=500)
    api.upload_folder(repo_id=REPO, folder_path=_folder(Path(os.environ["HF_HOME"])))  # retried once, silently
    assert hub.ops.count("commit") == 3 and instant_retries == [1]
    assert "x.txt" not in hub.files(REPO) and "config.json" in hub.files(REPO)


def test_refused_connection_raises_and_the_server_comes_back(hub: HubServer) -> None:
    from huggingface_hub import create_repo, hf_hub_download, whoami
    from huggingface_hub.utils import httpx

    hub.add_repo(REPO, {"a.txt": b"a"})
    cached = hf_hub_download(REPO, "a.txt")
    whoami()  # leaves a pooled keep-alive connection: refusing must hang it up too
    port = hub.port
    with hub.refused():
        with pytest.raises(httpx.ConnectError):
            create_repo("other")
        assert hf_hub_download(REPO, "a.txt") == cached  # downloads fall back to the cache
    assert hub.port == port and create_repo("other").repo_id == "loopback-user/other"
    assert "create" in hub.ops and hub.requests[-1].status == 200


def test_dropped_and_delayed_answers(hub: HubServer) -> None:
    from huggingface_hub import create_repo, whoami
    from huggingface_hub.utils import httpx

    hub.fail_next("create", drop=True)
    with pytest.raises(httpx.RemoteProtocolError):
        create_repo("tiny")
    assert not hub.repo_exists(REPO) and hub.requests[-1].status == 0
    hub.delay_next("whoami", 0.3)
    start = time.monotonic()
    whoami()
    assert time.monotonic() - start >= 0.3


def test_bad_token_is_refused(hub: HubServer) -> None:
    from huggingface_hub import create_repo
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as refused:
        create_repo("tiny", token="hf_wrong")
    assert refused.value.response.status_code == 401 and not hub.repo_exists(REPO)


def test_nothing_leaks_outside_the_fixture() -> None:
    """Runs after the tests above: the environment and the patched objects are back to what they were."""
    from huggingface_hub import constants, hf_api
    from transformers.utils import hub as transformers_hub

    assert os.environ.get("HF_TOKEN") != DUMMY_TOKEN
    assert "127.0.0.1" not in constants.ENDPOINT and hf_api.api.endpoint == constants.ENDPOINT
    assert "127.0.0.1" not in constants.HUGGINGFACE_CO_URL_TEMPLATE
    cached_api = transformers_hub._hf_api
    assert cached_api is None or cached_api.endpoint == constants.ENDPOINT
