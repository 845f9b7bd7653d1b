"""Mean-flow weight files from elsewhere: the MeanFlow port's state dict (`r_embedder.*`: the separate form) and DMF's
(`logvar_linear.*` dropped, the decoupled depth named with --decoupled-depth), refused without their objective or
depth, sampled and converted with them, recorded once converted; and files whose recorded form is unusable.

The golden files are tests/golden-meanflow/ (README Sections 4, 5, 7): both trained data-to-noise, 10 classes plus the
null row, width 32 with 2 heads.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import dit, ok, perturbed, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_flow_formats import one_line_error

import ditcli.model.dit
from ditcli.diffusion.flow import FlowMatching
from ditcli.diffusion.flow_map import sample_flow_map
from ditcli.diffusion.objectives import MeanFlowObjective
from ditcli.diffusion.samplers import FLOW_MAP
from ditcli.model.dit import DiT
from ditcli.weights.checkpoint import load_checkpoint, save_safetensors
from ditcli.weights.record import Checkpoint

GOLDEN_MF = Path(__file__).resolve().parent / "golden-meanflow"
PORT, DMF = GOLDEN_MF / "meanflow-tiny.pt", GOLDEN_MF / "dmf-tiny.pt"
MEANFLOW = MeanFlowObjective("data-to-noise")
NAMED = ["--objective", "meanflow", "--time-direction", "data-to-noise"]
FORMS = {"port": (PORT, [], {"mean_flow_form": "separate"}),
         "dmf": (DMF, ["--decoupled-depth", 3], {"mean_flow_form": "decoupled", "decoupled_depth": 3})}


@pytest.fixture
def golden_heads(monkeypatch):
    """`dit sample` has no --num-heads: the golden models' width 32 gets its 2 heads as a preset width would."""
    monkeypatch.setitem(ditcli.model.dit.HEADS_BY_WIDTH, 32, 2)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random 4-channel AutoencoderKL folder (2x downsampling), as tests/test_flow_formats.py builds it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                        norm_num_groups=8, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture
def recorded(tmp_path) -> Path:
    """Our .safetensors of a DMF-form model with guidance 2.5 trained in."""
    config = tiny_config(learn_sigma=False, mean_flow_form="decoupled", decoupled_depth=1)
    path = tmp_path / "dmf.safetensors"
    save_safetensors(Checkpoint(perturbed(DiT(config)).state_dict(), config, "test",
                                objective=MeanFlowObjective("data-to-noise", 2.5)), path)
    return path


@pytest.mark.parametrize("name", FORMS)
def test_golden_files_sample_through_dit_sample_with_their_objective(name, golden_heads, tiny_vae, tmp_path,
                                                                     offline):
    path, depth, form = FORMS[name]
    out = tmp_path / "out"
    ok("sample", "--ckpt", path, *NAMED, *depth, "--vae", tiny_vae, "--num", 2, "--steps", 1, "--out", out)
    assert len(list(out.glob("0*.png"))) == 2 and (out / "grid.png").is_file()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["objective"] == {"objective": "meanflow", "time_direction": "data-to-noise"}
    assert provenance["nfe"] == 1 and provenance["sampler"] == FLOW_MAP
    assert {k: provenance["model_config"].get(k) for k in form} == form


@pytest.mark.parametrize("path, depth, vectors, final", [
    (PORT, None, "meanflow.vectors.safetensors", "sample.1step.nocfg.final"),
    (DMF, 3, "dmf.vectors.safetensors", "sample.euler.1step.final"),
])
def test_one_step_sample_of_a_golden_file_equals_the_original_code(path, depth, vectors, final):
    golden = load_file(GOLDEN_MF / vectors)
    model = load_checkpoint(path, num_heads=2, objective=MEANFLOW, decoupled_depth=depth).build()
    y, flow = golden["sample.y"], FlowMatching("data-to-noise", learn_sigma=False)
    ours = sample_flow_map(lambda x, t, r: model(x, t, y, r=r), golden["sample.z"], flow)
    ref = golden[final]
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_dmf_depth_is_used_not_only_recorded():
    """One block more or less on r moves the output by about 2e-3 (README effect table): the depth given is the one
    that runs."""
    golden = load_file(GOLDEN_MF / "dmf.vectors.safetensors")
    x, y, t = golden["sample.z"], golden["sample.y"], torch.ones(4)
    outs = [load_checkpoint(DMF, num_heads=2, objective=MEANFLOW, decoupled_depth=k).build()(x, t, y, r=0 * t)
            for k in (2, 3)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


REFUSALS = {
    "port without objective": (PORT, [], ["MeanFlow", "--objective meanflow --time-direction data-to-noise"]),
    "dmf without anything": (DMF, [], ["DMF", "--objective meanflow", "--decoupled-depth K"]),
    "dmf without depth": (DMF, NAMED, ["DMF", "decoupled depth", "--decoupled-depth K"]),
    "dmf depth past its blocks": (DMF, [*NAMED, "--decoupled-depth", 5], ["--decoupled-depth 5", "[1, 4]"]),
    "dmf depth zero": (DMF, [*NAMED, "--decoupled-depth", 0], ["--decoupled-depth 0", "[1, 4]"]),
    "port given a depth": (PORT, [*NAMED, "--decoupled-depth", 1], ["contradicts", "r_embedder.*", "separate"]),
    "port as a flow model": (PORT, ["--objective", "flow", "--time-direction", "data-to-noise"],
                             ["mean-flow model", "--objective meanflow"]),
    "sit as a mean-flow model": (Path(__file__).resolve().parent / "golden-flow" / "sit-tiny.pt", NAMED,
                                 ["no second time input", "--decoupled-depth K"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_file_without_its_objective_or_form_is_refused_in_one_line_and_nothing_is_written(
        case, golden_heads, tiny_vae, tmp_path, offline):
    path, options, fragments = REFUSALS[case]
    out = tmp_path / "out"
    one_line_error(dit("sample", "--ckpt", path, *options, "--vae", tiny_vae, "--num", 2, "--steps", 1, "--out", out),
                   *fragments)
    one_line_error(dit("convert", path, tmp_path / "out.safetensors", *options, "--num-heads", 2), *fragments)
    one_line_error(dit("convert", "--info", path, *options, "--num-heads", 2), *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", FORMS)
def test_golden_files_convert_to_safetensors_that_record_objective_and_form(name, tmp_path):
    path, depth, form = FORMS[name]
    dst = tmp_path / "out.safetensors"
    report = json.loads(ok("convert", path, dst, *NAMED, *depth, "--num-heads", 2, "--json").stdout)
    assert report["parity"]["roundtrip"]["identical_weights"] and report["parity"]["roundtrip"]["max_abs_diff"] == 0
    with safe_open(str(dst), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert metadata["objective"] == "meanflow" and metadata["time_direction"] == "data-to-noise"
    assert {k: json.loads(metadata["config"]).get(k) for k in form} == form
    assert not [k for k in keys if k.startswith("logvar_linear.")]
    source = torch.load(path, weights_only=True)
    assert keys == {k for k in source if not k.startswith("logvar_linear.")}
    assert [w.split(":")[0] for w in report["warnings"] if w.startswith("dropped")] == (
        [] if name == "port" else ["dropped logvar_linear.* (2 tensors"])

    back = load_checkpoint(dst)  # the record decides from now on: no option needed
    assert back.objective == MEANFLOW and back.objective_recorded and not back.dropped
    assert all(torch.equal(back.state_dict[k], source[k]) for k in back.state_dict)
    info = json.loads(ok("convert", "--info", dst, "--json").stdout)
    assert info["form"] == ("separate" if name == "port" else "decoupled 3")
    assert info["objective_source"] == "recorded in the file"


def test_convert_round_trips_objective_trained_guidance_and_form(recorded, tmp_path):
    ok("convert", recorded, tmp_path / "a.safetensors")
    ok("convert", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--decoupled-depth", 1)  # agrees: taken
    source, back = load_checkpoint(recorded), load_checkpoint(tmp_path / "b.safetensors")
    assert back.objective == MeanFlowObjective("data-to-noise", 2.5) == source.objective
    assert back.config == source.config and back.config.decoupled_depth == 1
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert float(f.metadata()["trained_cfg"]) == 2.5
    assert all(torch.equal(back.state_dict[k], v) for k, v in source.state_dict.items())


def test_info_shows_the_form_and_the_objective(recorded):
    lines = ok("convert", "--info", recorded).output.splitlines()
    assert [line.split()[:4] for line in lines if line.split()[:2] == ["mean-flow", "form"]] == [
        ["mean-flow", "form", "decoupled", "1"]]
    assert [line.split()[1:5] for line in lines if line.split()[:1] == ["objective"]] == [
        ["meanflow,", "time", "data-to-noise,", "guidance"]]
    port = ok("convert", "--info", PORT, *NAMED, "--num-heads", 2).output.splitlines()
    assert [line.split()[:3] for line in port if line.split()[:2] == ["mean-flow", "form"]] == [
        ["mean-flow", "form", "separate"]]
    dmf = ok("convert", "--info", DMF, *NAMED, "--decoupled-depth", 3, "--num-heads", 2).output.splitlines()
    assert [line for line in dmf if line.startswith("dropped: logvar_linear.* (2 tensors")], dmf
    plain = ok("convert", "--info", Path(__file__).resolve().parent / "golden" / "tiny-dit.official.pt",
               "--num-heads", 4).output
    assert "mean-flow form" not in plain


def test_a_contradicting_decoupled_depth_is_refused_for_a_recorded_file(recorded, tmp_path, offline):
    out, dst = tmp_path / "out", tmp_path / "x.safetensors"
    fragments = ["--decoupled-depth 2", "contradicts", "records decoupled depth 1"]
    one_line_error(dit("convert", "--info", recorded, "--decoupled-depth", 2), *fragments)
    one_line_error(dit("convert", recorded, dst, "--decoupled-depth", 2), *fragments)
    one_line_error(dit("sample", "--ckpt", recorded, "--decoupled-depth", 2, "--num", 2, "--out", out), *fragments)
    assert not out.exists() and not dst.exists()


@pytest.mark.parametrize("source", ["recorded", "named"])
def test_mean_flow_model_is_never_exported_as_a_diffusers_pipeline(source, recorded, tmp_path, offline):
    args = [recorded] if source == "recorded" else [PORT, *NAMED, "--num-heads", 2]
    out = tmp_path / "pipeline"
    one_line_error(dit("convert", args[0], out, "--to", "diffusers", *args[1:]), "mean-flow model", ".safetensors")
    assert not out.exists()


def with_config(recorded: Path, path: Path, **changes) -> Path:
    """`recorded` with its config metadata changed as a hand edit would."""
    state = load_file(recorded)
    with safe_open(str(recorded), "pt") as f:
        metadata = dict(f.metadata())
    metadata["config"] = json.dumps({**json.loads(metadata["config"]), **changes})
    save_file(state, str(path), metadata=metadata)
    return path


def train_checkpoint_with(path: Path, **changes) -> Path:
    """A `dit train` checkpoint whose recorded model config is changed as a hand edit would."""
    model = {**tiny_config(learn_sigma=False).to_dict(), **changes}
    torch.save({"format": "ditcli-train", "config": {"model": model, "train": {}}, "ema": {}}, path)
    return path


UNUSABLE = {"unknown form": ({"mean_flow_form": "sideways"}, ["mean_flow_form", "sideways"]),
            "depth past the blocks": ({"decoupled_depth": 7}, ["decoupled_depth", "7"]),
            "depth without the form": ({"mean_flow_form": None, "decoupled_depth": 1}, ["decoupled_depth"])}


@pytest.mark.parametrize("kind", ["safetensors", "train"])
@pytest.mark.parametrize("case", UNUSABLE)
def test_a_file_with_an_unusable_form_is_refused_naming_the_file_and_field(case, kind, recorded, tmp_path, offline):
    changes, fragments = UNUSABLE[case]
    if kind == "safetensors":
        path = with_config(recorded, tmp_path / "bad.safetensors", **changes)
    else:
        fields = {"mean_flow_form": "decoupled", "decoupled_depth": 1, **changes}
        path = train_checkpoint_with(tmp_path / "bad.pt", **{k: v for k, v in fields.items() if v is not None})
    before = set(tmp_path.iterdir())
    for args in (["sample", "--ckpt", path, "--num", 2, "--out", tmp_path / "out"],
                 ["convert", path, tmp_path / "out.safetensors"], ["convert", "--info", path]):
        one_line_error(dit(*args), str(path), "unusable model config", *fragments)
    assert set(tmp_path.iterdir()) == before


def test_runtime_guidance_on_a_model_with_guidance_trained_in_warns(recorded, tiny_vae, tmp_path, offline):
    """Guiding such a model again at sampling time extrapolates twice (MeanFlow issue 45): one warning line, and the
    run still goes ahead; at cfg 1 nothing is said."""
    guided = ok("sample", "--ckpt", recorded, "--vae", tiny_vae, "--num", 1, "--cfg", 2, "--out", tmp_path / "a")
    plain = ok("sample", "--ckpt", recorded, "--vae", tiny_vae, "--num", 1, "--cfg", 1, "--out", tmp_path / "b")
    assert "guidance 2.5 trained in" in guided.output and "pass --cfg 1" in guided.output
    assert "trained in" not in plain.output
