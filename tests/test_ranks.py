"""Agreed decisions across ranks, in one process: errors, the timeout option and the end-of-run checkpoint.

The multi-process behaviour (signals, dead peers, rank-local run folders) is in tests/test_scale.py."""

import pytest
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.errors import UserError
from ditcli.ranks import AgreedError, from_rank0, on_every_rank
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer

TINY = dict(model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
            global_batch=4, lr=1e-3, log_every=1, seed=0)


def test_alone_the_helpers_are_local_calls():
    assert from_rank0(41) == 41 and on_every_rank(lambda: 42) == 42
    with pytest.raises(AgreedError, match=r"^x not found \(look\)$"):
        on_every_rank(lambda: (_ for _ in ()).throw(UserError("x not found", "look")), "cannot read")


@pytest.mark.parametrize("command", [["train", "--data", "fashion-mnist"], ["sample", "--ckpt", "x.pt"]])
@pytest.mark.parametrize("value", ["0", "-5", "inf", "1e300"])
def test_dist_timeout_must_be_positive_and_at_most_a_week(command, value):
    result = CliRunner().invoke(app, [*command, "--dist-timeout", value, "--device", "cpu"])
    assert result.exit_code == 2 and "error: --dist-timeout must be in (0, 604,800] seconds" in result.output


def test_the_last_step_is_saved_once_when_it_is_a_checkpoint_step(tmp_path, monkeypatch):
    import numpy as np

    np.savez(tmp_path / "d.npz", images=np.zeros((8, 8, 8, 1), np.uint8))
    saves = []
    save = Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: (saves.append(self.state.step), save(self)))
    trainer = Trainer(TrainConfig(data=str(tmp_path / "d.npz"), out=str(tmp_path / "run"), steps=4, ckpt_every=2,
                                  **TINY))
    trainer.run()
    assert saves == [2, 4]
    stopped = Trainer(TrainConfig(data=str(tmp_path / "d.npz"), out=str(tmp_path / "run"), steps=8, ckpt_every=2,
                                  **TINY), should_stop=lambda: True, resume="auto")
    result = stopped.run()
    assert result["step"] == 5 and result["interrupted"] and saves == [2, 4, 5]


def test_command_line_errors_are_reported_by_rank_0_alone(monkeypatch):
    from typer.testing import CliRunner

    from ditcli.cli.app import app

    cases = [["train", "--data", "x.npz", "--num-heads", "3", "--hidden-size", "64"],  # a check of the options
             ["sample", "--cfgg", "2"]]                                                 # Typer's own usage error
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        for args in cases:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2 and ("error:" in result.output) == printed, (rank, args, result.output)
