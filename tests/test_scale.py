"""Scale-out that survives faults: `dit train` and `dit sample` under torchrun with 2 gloo processes on the CPU.

Every rank must take each decision that leads to a collective, a checkpoint, a stop or an exit from agreed state, so
a signal to one rank, a dead or stalled peer, or a rank that cannot see the run folder ends every rank the same way.
Faults are injected by tests/faults/dit_with_fault.py. Every subprocess wait is bounded, so a hang fails the test.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditcli.io import safe_torch_load

pytestmark = pytest.mark.slow

FAULTY_DIT = str(Path(__file__).resolve().parent / "faults" / "dit_with_fault.py")
TRAIN = ["train", "--vae", "none", "--image-size", "16", "--model", "DiT-S/4", "--hidden-size", "48", "--depth", "2",
         "--num-heads", "3", "--global-batch", "8", "--lr", "1e-3", "--device", "cpu", "--log-every", "1"]
WAIT_S = int(os.environ.get("DIT_TEST_WAIT_S", "240"))  # per subprocess; a hang fails the test


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "D.npz"
    np.savez(path, images=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8), labels=np.arange(64) % 4)
    return path


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun(args: list[str], fault: str | None = None, max_restarts: int = 0,
             nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone` of `dit ARGS` (through the fault injector), failing the test after WAIT_S seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--max-restarts", str(max_restarts), FAULTY_DIT, *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(**({"DIT_FAULT": fault} if fault else {})), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: a hung run leaves nothing behind
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def by_hand(per_rank: list[list[str]], fault: str | None = None, stop_after: float = WAIT_S):
    """Two ranks started without torchrun (as on two nodes), each with its own arguments; (returncode, stderr) each.

    After the first rank exits, the others get `stop_after` seconds before they are killed (a stopped rank never
    exits by itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, args in enumerate(per_rank):
        rank_env = env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(len(per_rank)), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), **({"DIT_FAULT": fault} if fault else {}))
        procs.append(subprocess.Popen([sys.executable, FAULTY_DIT, *args], env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for i, proc in enumerate(procs):
            try:
                _, err = proc.communicate(timeout=WAIT_S if i == 0 else stop_after)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def ckpt(out: Path, step: int) -> dict:
    return safe_torch_load(out / f"ckpt-{step:07d}.pt")


def steps_saved(out: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in out.glob("ckpt-*.pt"))


def assert_same_state(a: dict, b: dict, atol: float = 0.0):
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=atol, msg=f"{key}.{name}")
    if atol == 0.0:
        for i, state in a["optimizer"]["state"].items():
            for name, tensor in state.items():
                assert torch.equal(b["optimizer"]["state"][i][name], tensor), f"optimizer.{i}.{name}"


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run: 20 steps, a checkpoint every 5 (so the last step is a checkpoint step)."""
    out = tmp_path_factory.mktemp("straight")
    result = torchrun([*TRAIN, "--data", str(data), "--steps", "20", "--ckpt-every", "5", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_steps_a_multiple_of_ckpt_every_finish_and_equal_one_process(straight, data, tmp_path):
    assert steps_saved(straight)[-1] == 20
    single = subprocess.run([sys.executable, "-m", "ditcli", *TRAIN, "--data", str(data), "--steps", "20",
                             "--ckpt-every", "5", "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=WAIT_S, env=env())
    assert single.returncode == 0, single.stderr[-2000:]
    assert_same_state(ckpt(tmp_path, 20), ckpt(straight, 20), atol=1e-5)


def test_sigterm_to_one_rank_stops_both_at_the_same_step_then_resumes_exactly(straight, data, tmp_path):
    args = [*TRAIN, "--data", str(data), "--steps", "20", "--ckpt-every", "5", "--out", str(tmp_path)]
    stopped = torchrun(args, fault="TERM:1:7")  # rank 1 alone is told to stop after its step 7
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert steps_saved(tmp_path) == [5, 8]  # the request reached every rank in step 8's all-reduce
    assert "every rank stops after step 8" in stopped.stderr
    assert stopped.stderr.count("start step") == 1 and "received SIGTERM" not in stopped.stderr  # rank 0 renders
    resumed = torchrun([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(ckpt(straight, 20), ckpt(tmp_path, 20))


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_bit_exact(straight, data, tmp_path):
    args = [*TRAIN, "--data", str(data), "--steps", "20", "--ckpt-every", "5", "--out", str(tmp_path),
            "--resume", "auto"]
    result = torchrun(args, fault="KILL:1:8", max_restarts=2)  # kill -9 of rank 1 after step 8
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: " in result.stderr and "(step 5)" in result.stderr  # the restarted group went back to step 5
    assert_same_state(ckpt(straight, 20), ckpt(tmp_path, 20))


def test_a_dead_peer_gives_one_line_naming_it(data, tmp_path):
    args = [*TRAIN, "--data", str(data), "--steps", "20", "--out", str(tmp_path)]
    (rc0, err0), (rc1, _) = by_hand([args, args], fault="KILL:1:3")
    assert rc1 == -signal.SIGKILL and rc0 == 2
    assert err0.count("error:") == 1 and "rank 0 of 2: rank 1 stopped answering while training step" in err0
    assert "Traceback" not in err0


def test_a_stalled_peer_times_out_instead_of_hanging(data, tmp_path):
    args = [*TRAIN, "--data", str(data), "--steps", "20", "--out", str(tmp_path), "--dist-timeout", "5"]
    (rc0, err0), _ = by_hand([args, args], fault="STOP:1:3", stop_after=1)
    assert rc0 == 2 and "rank 1 stopped answering" in err0 and "waited at most 5 s" in err0


def test_a_rank_that_cannot_see_the_checkpoint_stops_every_rank(data, tmp_path):
    shared, local = tmp_path / "node0", tmp_path / "node1"
    args = [*TRAIN, "--data", str(data), "--steps", "10", "--ckpt-every", "5"]
    first = subprocess.run([sys.executable, "-m", "ditcli", *args, "--steps", "5", "--out", str(shared)],
                           capture_output=True, text=True, timeout=WAIT_S, env=env())
    assert first.returncode == 0, first.stderr[-2000:]
    # Two "nodes" without a shared disk: rank 1's --out is empty.
    (rc0, err0), (rc1, err1) = by_hand([[*args, "--out", str(shared), "--resume", "auto"],
                                        [*args, "--out", str(local), "--resume", "auto"]])
    assert rc0 == rc1 == 2, (err0[-2000:], err1[-2000:])
    assert "rank 1 cannot read the checkpoint" in err0 and "all nodes share" in err0
    assert "error:" not in err1  # one clear error, from rank 0
    assert steps_saved(shared) == [5] and not steps_saved(local)


def test_a_rank_that_cannot_see_the_latent_cache_stops_every_rank(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16).save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "D.npz", images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    args = ["train", "--data", str(tmp_path / "D.npz"), "--vae", str(tmp_path / "vae"), "--image-size", "16",
            "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--global-batch", "4",
            "--steps", "2", "--device", "cpu"]
    (rc0, err0), (rc1, err1) = by_hand([[*args, "--out", str(tmp_path / "a")], [*args, "--out", str(tmp_path / "b")]])
    assert rc0 == rc1 == 2, (err0[-2000:], err1[-2000:])
    assert "rank 1 cannot read the latent cache" in err0 and "all nodes share" in err0


def test_sampling_worker_killed_then_rerun_gives_a_byte_identical_npz(tmp_path):
    from conftest import perturbed, tiny_config

    from ditcli.model.dit import DiT
    from ditcli.weights.checkpoint import save_safetensors
    from ditcli.weights.record import Checkpoint

    config = tiny_config(in_channels=3, input_size=8, num_classes=4)
    save_safetensors(Checkpoint(perturbed(DiT(config)).state_dict(), config, "safetensors", class_names=list("abcd"),
                                codec={"kind": "pixel", "channels": 3}), tmp_path / "m.safetensors")
    args = ["sample", "--ckpt", str(tmp_path / "m.safetensors"), "--num-images", "13", "--steps", "4",
            "--sampler", "ddim", "--batch-size", "2", "--device", "cpu"]
    whole = subprocess.run([sys.executable, "-m", "ditcli", *args, "--npz", str(tmp_path / "one.npz")],
                           capture_output=True, text=True, timeout=WAIT_S, env=env())
    assert whole.returncode == 0, whole.stderr[-2000:]
    npz = ["--npz", str(tmp_path / "two.npz")]
    killed = torchrun([*args, *npz], fault="KILL:1:1")  # rank 1 (6 images) dies after its first batch of 4
    assert killed.returncode != 0 and not (tmp_path / "two.npz").exists()
    assert len(list((tmp_path / "two.npz.parts").glob("shard-*.json"))) >= 1
    again = torchrun([*args, *npz])  # 13 images on 2 ranks: an uneven split
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    assert "sampling (rank 0 of 2)" in again.stderr and "wrote 13 images" in again.stdout  # the bar: rank 0's share


# The same fault trials for the mean-flow objective, whose step adds a JVP on the unwrapped module to the DDP forward.
MEAN_FLOW = ["--objective", "meanflow", "--decoupled-depth", "1", "--interval-ratio", "0.5", "--train-guidance",
             "model", "--train-omega", "0.5"]


@pytest.fixture(scope="module")
def mean_flow_straight(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mean-flow-straight")
    result = torchrun([*TRAIN, *MEAN_FLOW, "--data", str(data), "--steps", "12", "--ckpt-every", "4", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_mean_flow_sigterm_to_one_rank_then_resume_is_bit_exact(mean_flow_straight, data, tmp_path):
    args = [*TRAIN, *MEAN_FLOW, "--data", str(data), "--steps", "12", "--ckpt-every", "4", "--out", str(tmp_path)]
    stopped = torchrun(args, fault="TERM:1:5")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert steps_saved(tmp_path) == [4, 6]  # rank 1's request reached rank 0 in step 6's all-reduce
    resumed = torchrun([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(ckpt(mean_flow_straight, 12), ckpt(tmp_path, 12))


def test_mean_flow_killed_worker_is_restarted_and_ends_bit_exact(mean_flow_straight, data, tmp_path):
    args = [*TRAIN, *MEAN_FLOW, "--data", str(data), "--steps", "12", "--ckpt-every", "4", "--out", str(tmp_path),
            "--resume", "auto"]
    result = torchrun(args, fault="KILL:1:6", max_restarts=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: " in result.stderr and "(step 4)" in result.stderr
    assert_same_state(ckpt(mean_flow_straight, 12), ckpt(tmp_path, 12))


def test_mean_flow_sampling_on_two_ranks_equals_one(mean_flow_straight, tmp_path):
    args = ["sample", "--ckpt", str(mean_flow_straight / "ckpt-0000012.pt"), "--num-images", "7", "--steps", "2",
            "--weights", "model", "--batch-size", "2", "--device", "cpu"]
    whole = subprocess.run([sys.executable, "-m", "ditcli", *args, "--npz", str(tmp_path / "one.npz")],
                           capture_output=True, text=True, timeout=WAIT_S, env=env())
    assert whole.returncode == 0, whole.stderr[-2000:]
    two = torchrun([*args, "--npz", str(tmp_path / "two.npz")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    assert "NFE 2 per image" in whole.stdout  # the flow map: one forward per step
