import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.model.dit import DiT, DiTConfig

GOLDEN = Path(__file__).resolve().parent / "golden"


def tiny_config(**overrides) -> DiTConfig:
    fields = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    fields.update(overrides)
    return DiTConfig(**fields)


def perturbed(model: DiT, seed: int = 0, std: float = 0.05) -> DiT:
    """Move every weight off the zero init so all layers matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same numbers whatever ran before it, so a failure always reproduces."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"golden vectors not found at {GOLDEN}")
    meta = json.loads((GOLDEN / "tiny-dit.json").read_text())
    return meta, load_file(str(GOLDEN / "tiny-dit.vectors.safetensors"))


@pytest.fixture(scope="session")
def golden_model(golden):
    meta, _ = golden
    model = DiT(DiTConfig(**meta["config"]))
    model.load_state_dict(torch.load(GOLDEN / "tiny-dit.official.pt", weights_only=True), strict=True)
    return model.eval()


def assert_close_to_ref(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4):
    bound = rel * ref.abs().max().item()
    diff = (ours.double() - ref.double()).abs().max().item()
    assert diff <= bound, f"max |ours - ref| = {diff:.3g} > {bound:.3g}"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A private cache home and no hub access: nothing a test runs can download."""
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def dit(*args):
    """`dit ARGS` through Typer's front door; paths and numbers may be passed as they are."""
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    """`dit ARGS`, which must succeed."""
    result = dit(*args)
    assert result.exit_code == 0, result.output
    return result


def assert_user_error(result, *fragments: str):
    """A refusal as the shell shows it: exit 2, one `error:` line holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def metrics(out: Path) -> list[dict]:
    """A run folder's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class LoopbackServer:
    """Serves `payload` on 127.0.0.1 with Range support, recording each request's Range header; the first `cuts`
    responses stop halfway through. Never the network."""

    def __init__(self, payload: bytes, cuts: int = 0, ranges: bool = True, name: str = "DiT-test.pt"):
        self.cuts, self.ranges, self.requests = cuts, ranges, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                asked = self.headers.get("Range")
                outer.requests.append(asked)
                start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and outer.ranges else 0
                body = payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cuts > 0:
                    outer.cuts -= 1
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
