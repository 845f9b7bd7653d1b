"""Finding and downloading known weights, against a loopback HTTP server (never the network)."""

import hashlib
import json

import pytest
from conftest import LoopbackServer

from ditcli import downloads
from ditcli.downloads import download
from ditcli.errors import UserError
from ditcli.weights import registry
from ditcli.weights.registry import KnownWeights, known_weights, resolve_weights

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server():
    servers = []

    def make(**kwargs):
        servers.append(LoopbackServer(PAYLOAD, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    for name in ("DIT_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def test_download_checks_size_and_sha256_and_renames(server, tmp_path):
    s = server()
    seen = []
    dest = download(s.url, tmp_path / "w.pt", len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest(),
                    progress=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "w.pt.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    s = server(cuts=1)
    dest = download(s.url, tmp_path / "w.pt", len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD
    assert s.requests[0] is None and s.requests[1] == f"bytes={len(PAYLOAD) // 2}-"


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    s = server(cuts=3)
    with pytest.raises(downloads.DownloadError, match="connection closed"):
        download(s.url, tmp_path / "w.pt", attempts=1)
    part = tmp_path / "w.pt.part"
    assert part.exists() and 0 < part.stat().st_size < len(PAYLOAD) and not (tmp_path / "w.pt").exists()
    s.cuts = 0
    download(s.url, tmp_path / "w.pt")
    assert (tmp_path / "w.pt").read_bytes() == PAYLOAD
    assert s.requests[-1] == f"bytes={len(PAYLOAD) // 2}-"


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    s = server(ranges=False)
    (tmp_path / "w.pt.part").write_bytes(b"stale bytes")
    download(s.url, tmp_path / "w.pt")
    assert (tmp_path / "w.pt").read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    s = server()
    with pytest.raises(downloads.DownloadError, match="sha256"):
        download(s.url, tmp_path / "w.pt", sha256="0" * 64)
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w.pt.part").exists()


def test_resolve_downloads_into_dit_home_once(server, isolated_home):
    s = server()
    entry = KnownWeights("Test", 256, "DiT-test.pt", s.url, size=len(PAYLOAD))
    path = resolve_weights(entry)
    assert path == isolated_home / "DiT-test.pt" and path.read_bytes() == PAYLOAD
    assert resolve_weights(entry) == path and len(s.requests) == 1


def test_offline_error_names_file_url_and_folder(isolated_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = known_weights("DiT-XL/2", 512)
    with pytest.raises(UserError) as err:
        resolve_weights(entry)
    message = str(err.value)
    assert "DiT-XL-2-512x512.pt" in message and entry.url in message and str(isolated_home) in message
    assert "\n" not in message


def test_unreachable_server_is_a_user_error(isolated_home):
    entry = KnownWeights("Test", 256, "DiT-test.pt", "http://127.0.0.1:9/DiT-test.pt")
    with pytest.raises(UserError, match=r"cannot download DiT-test.pt: no connection.*put it in"):
        resolve_weights(entry)


def test_registry_knows_the_released_checkpoints_and_the_embedded_model():
    assert known_weights("DiT-XL/2").url == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert known_weights("DiT-XL/2", 512).filename == "DiT-XL-2-512x512.pt"
    assert known_weights("fashion-mnist").url is None
    with pytest.raises(UserError, match="256, 512"):
        known_weights("DiT-XL/2", 384)
    assert known_weights("DiT-S/2") is None


def test_weights_found_in_a_checkout_folder_need_no_download(monkeypatch, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    file = known_weights("fashion-mnist").filename
    (folder / file).write_bytes(b"x")
    monkeypatch.setattr(registry, "weights_dirs", lambda: [tmp_path / "home", folder])
    assert resolve_weights(known_weights("fashion-mnist")) == folder / file


def test_sha256_of_a_file_and_of_a_folder_checkpoint(tmp_path):
    (tmp_path / "ckpt" / "transformer").mkdir(parents=True)
    (tmp_path / "ckpt" / "transformer" / "w.safetensors").write_bytes(PAYLOAD)
    expected = hashlib.sha256(PAYLOAD).hexdigest()
    assert downloads.file_sha256(tmp_path / "ckpt" / "transformer" / "w.safetensors") == expected
    before = downloads.file_sha256(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model_index.json").write_text("{}")
    assert downloads.file_sha256(tmp_path / "ckpt") != before


def test_a_remembered_sha256_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    path = tmp_path / "w.safetensors"
    path.write_bytes(PAYLOAD)
    first = downloads.remembered_sha256(path)
    assert first.sha256 == hashlib.sha256(PAYLOAD).hexdigest() and first.new
    assert not (tmp_path / "home").exists()  # nothing is written until the run goes ahead
    first.remember()
    reads = []
    monkeypatch.setattr(downloads, "file_sha256", lambda p: reads.append(p) or "fresh")
    again = downloads.remembered_sha256(path)
    assert again.sha256 == hashlib.sha256(PAYLOAD).hexdigest() and not again.new and reads == []
    path.write_bytes(PAYLOAD + b"more")  # a new size and modification time
    changed = downloads.remembered_sha256(path)
    assert changed.sha256 == "fresh" and len(reads) == 1
    changed.remember()
    memo = json.loads((tmp_path / "home" / "sha256.json").read_text())
    assert list(memo.values()) == ["fresh"]  # the stale entry for the same path is gone
