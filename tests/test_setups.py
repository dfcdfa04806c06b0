"""Pruning in everyday training set-ups: token and mask inputs, mixed precision, module
moves, training-only code, custom autograd, optional and keyword arguments, the user's
model left alone, parametrized weights, and the inputs prepare refuses."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from train_loop import train_steps

import fxprune
from fxprune.digits.models import resnet
from fxprune.state import UnitGate, gate_bank, state_of, theta_of


def force_removal(gated, pruner, share=0.25):
    """Switch off a share of every unit gate's units and remove them."""
    units = {}
    with torch.no_grad():
        for g, sl in state_of(gated).layout.units.items():
            n = sl.stop - sl.start
            drop = np.arange(n) < max(1, int(share * n))
            gate_bank(gated).theta[sl][torch.as_tensor(drop)] = 0.0
            units[g] = drop
    return pruner.remove(units, set())


def converts(gated, *inputs):
    compact = fxprune.convert(gated.eval())
    with torch.no_grad():
        torch.testing.assert_close(compact(*inputs), gated(*inputs), rtol=1e-4, atol=1e-5)
    return compact


# ---------------------------------------------------------------- token and mask inputs
class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(50, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, ids, keep):
        h = F.relu(self.fc(self.embed(ids))) * keep[..., None]  # keep: a bool mask [B, T]
        return self.head(h.mean(1))


def test_token_ids_and_bool_masks_train_through_removals():
    torch.manual_seed(0)
    ids, keep, y = torch.randint(0, 50, (16, 7)), torch.rand(16, 7) > 0.2, torch.randint(0, 3, (16,))
    gated = fxprune.prepare(Tokens(), (ids, keep), fxprune.PruneConfig("units", check_every=10**6))
    cg = fxprune.channel_graph(gated)
    assert {b.owner for b in cg.bindings if b.role == "producer" and cg.group_of(b.space).prunable} >= {"embed", "fc"}
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    pruner = fxprune.Pruner(gated, opt)
    gated.train()
    for _ in range(3):
        loss = F.cross_entropy(gated(ids, keep), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    force_removal(gated, pruner)
    assert gated.get_submodule("embed").weight.shape[1] < 16
    converts(gated, ids, keep)


# ---------------------------------------------------------------- mixed precision
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def amp_step(gated, opt, pruner, scaler, x, y, poison=False):
    loss = F.cross_entropy(gated(x), y) + pruner.penalty()
    if poison:
        loss = loss * float("inf")
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    pruner.step()


def test_grad_scaler_unscales_theta_gradients_and_skips_overflow_steps():
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    thetas = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig("units", gamma=5.0, theta_lr=0.5, warmup=0, check_every=2))
        opt = torch.optim.SGD(gated.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, enabled=scaled)
        pruner = fxprune.Pruner(gated, opt, scaler=scaler)
        gated.train()
        amp_step(gated, opt, pruner, scaler, x, y)
        thetas[scaled] = pruner.theta.detach().clone()
    torch.testing.assert_close(thetas[True], thetas[False], rtol=1e-4, atol=1e-6)  # not 16384 times larger
    assert (thetas[True] < 1).any() and (thetas[True] > 0).any()
    before = pruner.theta.detach().clone()
    amp_step(gated, opt, pruner, scaler, x, y, poison=True)  # the scaler skips this step; so does theta, and no error
    torch.testing.assert_close(pruner.theta.detach(), before)
    assert scaler.get_scale() < 2.0**14
    amp_step(gated, opt, pruner, scaler, x, y)
    assert not torch.equal(pruner.theta.detach(), before)


def test_bfloat16_autocast_trains_on_the_cpu():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    gated = fxprune.prepare(resnet(blocks=1, widths=(8, 12)), (x,),
                            fxprune.PruneConfig(gamma=5.0, warmup=0, check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05, momentum=0.9)
    pruner = fxprune.Pruner(gated, opt)
    gated.train()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(gated(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    assert torch.isfinite(loss) and (pruner.theta < 1).any()
    force_removal(gated, pruner)


# ---------------------------------------------------------------- moves
@pytest.mark.parametrize("move", ["double", "to-float64", "half-then-float", "bfloat16"])
def test_thetas_keep_learning_after_a_move(move):
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gated = fxprune.prepare(MLP(), (x,), fxprune.PruneConfig("units", theta_lr=0.5, warmup=0, check_every=10**6))
    opt = torch.optim.SGD(gated.parameters(), lr=0.01)
    pruner = fxprune.Pruner(gated, opt)
    dtype = {"double": torch.float64, "to-float64": torch.float64, "half-then-float": torch.float32,
             "bfloat16": torch.bfloat16}[move]
    if move == "double":
        gated.double()
    elif move == "half-then-float":
        gated.half().float()
    else:
        gated.to(dtype)
    theta = gate_bank(gated).theta
    assert theta.is_leaf and theta.requires_grad and theta.dtype == torch.float32
    gated.train()
    before = theta.detach().clone()
    train_steps(gated, opt, pruner, [(x.to(dtype), y)] * 2)
    assert not torch.equal(pruner.theta.detach(), before), "the gates must keep learning"
    assert pruner.forward_flops() > 0  # the stored example follows the model's dtype
    force_removal(gated, pruner)  # and removal's postcondition runs in it


# ---------------------------------------------------------------- training-only code
class AuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.body(x))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


def test_training_only_code_is_refused_by_name_or_traced_in_the_mode_asked():
    x = torch.randn(4, 6)
    with pytest.raises(fxprune.TraceError, match="another path in training than in eval mode.*aux"):
        fxprune.prepare(AuxHead(), (x,))
    gated = fxprune.prepare(AuxHead(), (x,), mode="train")
    out = gated.train()(x)
    assert isinstance(out, tuple) and len(out) == 2  # the aux head is in the gated model
    assert isinstance(fxprune.prepare(AuxHead(), (x,), mode="eval").eval()(x), torch.Tensor)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.b(F.dropout(F.relu(self.a(x)), 0.5, training=self.training))


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_functional_dropout_follows_the_gated_models_mode(traced_in):
    model, x = FunctionalDropout(), torch.randn(64, 6)
    model.train(traced_in == "train")
    gated = fxprune.prepare(model, (x,), fxprune.PruneConfig(theta_init=1.0))
    gated.train()
    torch.manual_seed(0)
    assert not torch.allclose(gated(x), gated(x)), "training mode drops out"
    gated.eval()
    torch.testing.assert_close(gated(x), gated(x))
    with torch.no_grad():
        torch.testing.assert_close(gated(x), model.eval()(x))


class Twice(torch.autograd.Function):
    """Forward is the identity, backward doubles the gradient: inlined, the backward is lost."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(Twice.apply(F.relu(self.a(x))))


def test_custom_autograd_function_stays_opaque_and_freezes_its_channels():
    torch.manual_seed(0)
    model, x = CustomFunction(), torch.randn(5, 4)
    gated = fxprune.prepare(model, (x,), inplace=True)
    assert [n.target.__name__ for n in gated.graph.nodes if n.op == "call_function" and "apply" in
            getattr(n.target, "__name__", "")] == ["Twice_apply"]
    model.eval()(x).sum().backward()
    want = model.a.weight.grad.clone()
    model.zero_grad()
    gated.eval()(x).sum().backward()
    torch.testing.assert_close(model.a.weight.grad, want)  # the custom backward ran
    cg = fxprune.channel_graph(gated)
    g = next(cg.group_of(b.space) for b in cg.bindings if b.owner == "a" and b.role == "producer")
    assert not g.prunable and "custom autograd.Function Twice" in g.frozen[0]


# ---------------------------------------------------------------- arguments
class Optional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, mask=None, scale=1.0):
        h = F.relu(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        return self.b(h)


def test_optional_arguments_take_their_defaults_or_the_values_given():
    torch.manual_seed(0)
    model, x, mask = Optional(), torch.randn(6, 4), (torch.rand(6, 8) > 0.5).float()
    for gated, call, want in [
        (fxprune.prepare(model, (x,)), lambda g: g(x), model(x)),
        (fxprune.prepare(model, (x, None, 1.0)), lambda g: g(x), model(x)),
        (fxprune.prepare(model, (x,), kwargs={"mask": mask, "scale": 2.0}), lambda g: g(x, mask), model(x, mask, 2.0)),
    ]:
        with torch.no_grad():
            torch.testing.assert_close(call(gated.eval()), want)
    cg = fxprune.channel_graph(fxprune.prepare(model, (x,)))
    assert [g.num_units for g in cg.prunable_groups] == [8]  # `mask is not None` was not traced as true
    with pytest.raises(AssertionError, match="scale has been specialized to have value 2.0"):
        gated(x, mask, 3.0)
    masked = fxprune.channel_graph(gated)  # the input mask multiplies those channels: they are kept
    assert not masked.prunable_groups and "graph input 'mask'" in masked.group_of(dict(masked.layer_outputs)["a"]).frozen[0]
    with pytest.raises(ValueError, match="needs 'x'"):
        fxprune.prepare(model, (), kwargs={"mask": mask})


# ---------------------------------------------------------------- the user's model
def test_the_users_model_is_left_alone_by_training_and_removal():
    torch.manual_seed(0)
    model = resnet(blocks=1, widths=(8, 12))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = copy.deepcopy(model.state_dict())
    one, two = fxprune.prepare(model, (x,)), fxprune.prepare(model, (x,))
    opt = torch.optim.SGD(one.parameters(), lr=0.1)
    pruner = fxprune.Pruner(one, opt)
    one.train()
    train_steps(one, opt, pruner, [(x, y)] * 2)
    with torch.no_grad():
        fxprune.state.theta_of(one, fxprune.LayerGate(0)).zero_()
    pruner.remove({}, {0})
    force_removal(one, pruner)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert {n for n, _ in two.named_parameters()} >= {n for n, _ in model.named_parameters()}  # the other copy: whole
    model(x)  # and the user's model still runs


# ---------------------------------------------------------------- parametrized weights
def test_weight_norm_keeps_output_channels_prunable_and_freezes_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), parametrizations.weight_norm(nn.Linear(8, 6)), nn.ReLU(),
                          nn.Linear(6, 2))
    x = torch.randn(5, 4)
    gated = fxprune.prepare(model, (x,))
    cg = fxprune.channel_graph(gated)
    out = next(cg.group_of(b.space) for b in cg.bindings if b.owner == "2" and b.role == "producer")
    inp = next(cg.group_of(b.space) for b in cg.bindings if b.owner == "0" and b.role == "producer")
    assert out.prunable and not inp.prunable and "weight_norm" in inp.frozen[0]
    fxprune.testing.random_masks(gated, keep=0.5, seed=0)
    compact = converts(gated, x)
    assert compact.get_submodule("2").parametrizations.weight.original1.shape[0] == 3


def test_spectral_norm_freezes_both_sides_with_the_reason():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), parametrizations.spectral_norm(nn.Linear(8, 6)), nn.ReLU(),
                          nn.Linear(6, 2))
    cg = fxprune.channel_graph(fxprune.prepare(model.eval(), (torch.randn(5, 4),)))
    out = next(cg.group_of(b.space) for b in cg.bindings if b.owner == "2" and b.role == "producer")
    assert not out.prunable and "parametrization" in out.frozen[0]


# ---------------------------------------------------------------- refused inputs
@pytest.mark.parametrize("wrap, match", [
    (nn.DataParallel, r"DataParallel wrapper: pass the module it wraps \(model.module\)"),
    (torch.compile, r"torch.compile'd module: pass the original module \(model._orig_mod\)"),
])
def test_wrappers_are_refused_saying_what_to_pass(wrap, match):
    with pytest.raises(TypeError, match=match):
        fxprune.prepare(wrap(MLP()), (torch.randn(2, 6),))


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        fxprune.prepare(model, (torch.randn(2, 6),))


def test_theta_of_reads_one_gate():
    gated = fxprune.prepare(MLP(), (torch.randn(2, 6),))
    g = next(iter(state_of(gated).layout.units))
    assert theta_of(gated, UnitGate(g)).numel() in (16, 12)
