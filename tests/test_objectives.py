"""The objective protocol: each objective is one adapter, and nothing outside the adapters asks which one it holds."""

import ast
import inspect
from pathlib import Path

import pytest

import ditcli
from ditcli.diffusion.ddpm import Diffusion
from ditcli.diffusion.flow import FlowMatching
from ditcli.diffusion.objectives import (
    DDPM,
    OBJECTIVES,
    DdpmObjective,
    FlowObjective,
    MeanFlowObjective,
    Objective,
    make_objective,
    objective_from_options,
    objective_from_record,
)
from ditcli.errors import UserError

PACKAGE = Path(ditcli.__file__).parent
ADAPTERS = {"diffusion/objectives.py"}
KINDS = {"DdpmObjective", "FlowObjective", "Diffusion", "FlowMatching"}


def objective_branches(source: str) -> list[str]:
    """Places in `source` that decide by an objective's name or type: a comparison of something named objective or
    kind with "ddpm"/"flow", an isinstance against an adapter or a process class, or a union of the processes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [op for op in operands if isinstance(op, ast.Constant) and op.value in OBJECTIVES]
            subjects = [op for op in operands if any(word in ast.unparse(op) for word in ("objective", "kind"))]
            if names and subjects:
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance":
            if any(name in KINDS for name in ast.unparse(node.args[1]).replace("(", " ").replace(")", " ")
                   .replace(",", " ").split()):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            if {ast.unparse(node.left), ast.unparse(node.right)} <= KINDS:
                found.append(ast.unparse(node))
    return found


def test_the_checker_sees_every_kind_of_objective_branch():
    assert objective_branches('if checkpoint.objective.name == "flow":\n    pass') != []
    assert objective_branches('x = a if objective.kind != "ddpm" else b') != []
    assert objective_branches('if "flow" == config.objective:\n    pass') != []
    assert objective_branches("ok = isinstance(process, (Diffusion, FlowMatching))") != []
    assert objective_branches("def f(p: Diffusion | FlowMatching): pass") != []
    assert objective_branches('if sampler == "ddpm":\n    pass') == []  # a sampler's name, not an objective's
    assert objective_branches("samplers = objective.samplers") == []


def test_nothing_outside_the_adapters_branches_on_the_objective():
    offenders = [f"{path.relative_to(PACKAGE).as_posix()}: {branch}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path.relative_to(PACKAGE).as_posix() not in ADAPTERS
                 for branch in objective_branches(path.read_text())]
    assert not offenders, "ask the objective adapter instead: " + "; ".join(offenders)


@pytest.mark.parametrize("objective", [DDPM, FlowObjective("noise-to-data"), FlowObjective("data-to-noise")])
def test_every_adapter_speaks_the_whole_protocol(objective):
    members = {name for name, _ in inspect.getmembers(Objective) if not name.startswith("_")}
    members |= set(Objective.__annotations__)
    assert members <= set(dir(objective))
    assert objective_from_record(**objective.to_metadata(), path="f") == objective
    assert objective.default_sampling.sampler in objective.samplers
    assert objective.trained_sampling.sampler in objective.samplers
    assert objective.preview_sampler in objective.samplers
    assert "safetensors" in objective.exports


def test_each_adapter_builds_its_own_process_and_plans():
    assert isinstance(DDPM.process(learn_sigma=True, schedule="cosine"), Diffusion)
    flow = FlowObjective("data-to-noise").process(learn_sigma=False, time_sampling="logit-normal", time_shift=3.0)
    assert isinstance(flow, FlowMatching) and (flow.direction, flow.time_shift) == ("data-to-noise", 3.0)
    assert DDPM.plan("ddim", 10, True).nfe == 10
    assert FlowObjective().plan("heun", 10, False).nfe == 20
    with pytest.raises(ValueError, match="samples flow-matching models"):
        DDPM.plan("dopri5", 10, True)
    with pytest.raises(ValueError, match="samples DDPM models"):
        FlowObjective().plan("ddim", 10, False)
    with pytest.raises(ValueError, match="cannot sample a mean-flow model .*flow-map"):
        MeanFlowObjective().plan("ddpm", 2, False)


def test_records_and_options_name_one_adapter():
    assert objective_from_record(None, None, "old.pt") == DDPM  # files from before the field
    assert objective_from_record("ddpm", "noise-to-data", "f") == DDPM  # a DDPM run's unused direction
    assert objective_from_options(None, None) is None
    assert objective_from_options("flow", None) == FlowObjective("noise-to-data")  # SiT's, as dit train writes
    assert objective_from_options(None, "data-to-noise") == FlowObjective("data-to-noise")
    with pytest.raises(UserError, match="only applies to --objective flow"):
        make_objective("ddpm", "data-to-noise")
    with pytest.raises(UserError, match="unknown objective 'x'"):
        objective_from_options("x", None)
    with pytest.raises(UserError, match="records an unusable objective"):
        objective_from_record("flow", "sideways", "f.safetensors")
    assert isinstance(make_objective("ddpm"), DdpmObjective)


def test_a_flow_model_refuses_what_only_ddpm_takes_and_the_other_way_round():
    with pytest.raises(UserError, match="DiTPipeline"):
        FlowObjective().check_export("diffusers", "m.safetensors")
    DDPM.check_export("diffusers", "m.safetensors")
    with pytest.raises(UserError, match="--time-shift only applies to flow-matching and mean-flow models"):
        DDPM.sampler_settings(2.0, None, None)
    with pytest.raises(UserError, match="--atol and --rtol only apply to flow-matching"):
        DDPM.sampler_settings(None, 1e-3, 1e-3)
    assert FlowObjective().sampler_settings(2.0, None, None).shift == 2.0
    with pytest.raises(UserError, match="not in flow time"):
        FlowObjective().check_interval((0, 700), ": here")
    DDPM.check_interval((0, 700), ": here")
    with pytest.raises(UserError, match="--schedule"):
        FlowObjective().check_training("cosine", [])
    with pytest.raises(UserError, match="--time-shift only applies"):
        DDPM.check_training("linear", ["--time-shift"])
    with pytest.raises(UserError, match="pass --time-direction data-to-noise"):
        FlowObjective("noise-to-data").check_source(FlowObjective("data-to-noise"), "src")
