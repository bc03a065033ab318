"""The README's recipes, run as written, checked against the host code's own formulas.

Each recipe block follows a ``<!-- recipe: NAME -->`` line in README.md; the tests
run that block and compare what it computes with the host codebase's GE2E
(written here from its definition: Real-Time-Voice-Cloning's similarity matrix
and mean cross-entropy, voxceleb_trainer's clamped one and prec1) on stand-ins
for the host's classes.
"""

import argparse
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ge2e_ext import GE2ELoss
from ge2e_ext.reference import ge2e_loss_reference
from ge2e_ext.metrics import top1_accuracy

from test_metrics import direct_eer

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe(name):
    text = README.read_text(encoding="utf-8")
    found = re.findall(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", text, re.S)
    assert len(found) == 1, f"README.md needs exactly one python block after <!-- recipe: {name} -->"
    return found[0]


def run_recipe(name):
    namespace = {"__name__": f"readme_recipe_{name}"}
    exec(compile(recipe(name), f"README.md:recipe {name}", "exec"), namespace)
    return namespace


def rtvc_loss_and_eer(embeds, w, b):
    """RTVC's SpeakerEncoder.loss, from its definition (loops, no sklearn):
    unit-norm embeds, inclusive centroids for other speakers, exclusive for the
    own one, w * cos + b, mean cross-entropy; EER over all N*M*N entries."""
    n, m, _ = embeds.shape
    incl = F.normalize(embeds.mean(1), dim=-1)
    sim = torch.zeros(n, m, n, dtype=embeds.dtype)
    for j in range(n):
        for i in range(m):
            excl = F.normalize(torch.cat([embeds[j, :i], embeds[j, i + 1:]]).mean(0), dim=0)
            for k in range(n):
                sim[j, i, k] = embeds[j, i] @ (excl if k == j else incl[k])
    sim = sim * w + b
    target = torch.arange(n).repeat_interleave(m)
    loss = F.cross_entropy(sim.reshape(n * m, n), target)
    same = torch.eye(n, dtype=torch.bool).unsqueeze(1).expand(n, m, n)
    return loss, direct_eer(sim.detach().flatten(), same.flatten())


def test_rtvc_recipe():
    ns = run_recipe("rtvc")
    model = ns["model"]
    assert set(dict(model.named_parameters())) >= {"similarity_weight", "similarity_bias"}
    assert model.similarity_weight.grad is not None and model.similarity_bias.grad is not None
    # the recipe's loss and EER against RTVC's formula, on a batch with some overlap
    torch.manual_seed(0)
    centres = torch.randn(6, 1, 40)
    frames = (centres + 1.5 * torch.randn(6, 5, 40)).reshape(30, 40)
    # unit norm in float64 too: RTVC's formula takes embeds @ centroid as the cosine
    embeds = F.normalize(model(frames).view(6, 5, -1).double(), dim=-1)
    w, b = model.similarity_weight.detach().double(), model.similarity_bias.detach().double()
    expected_loss, expected_eer = rtvc_loss_and_eer(embeds.detach(), w, b)
    loss, eer = model.loss(embeds)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    assert 0 < eer < 0.5 and eer == pytest.approx(expected_eer, abs=1e-9)
    # the gradients of w and b reach RTVC's parameters, as in RTVC (do_gradient_ops scales them)
    model.zero_grad()
    loss, _ = model.loss(model(frames).view(6, 5, -1))
    loss.backward()
    assert model.similarity_weight.grad.shape == (1,) and model.similarity_weight.grad != 0


class SpeakerNetStandIn(torch.nn.Module):
    """voxceleb_trainer's SpeakerNet as far as the loss goes: loss/<trainfunc>.py by
    module name, LossFunction(**kwargs) from all options, utterances reshaped to
    (speakers, nPerSpeaker, D), forward returning (loss, prec1)."""

    def __init__(self, trainfunc, nPerSpeaker, **kwargs):
        super().__init__()
        self.__S__ = torch.nn.Linear(kwargs["n_mels"], kwargs["nOut"])
        LossFunction = importlib.import_module("loss." + trainfunc).__getattribute__("LossFunction")
        self.__L__ = LossFunction(**kwargs)
        self.nPerSpeaker = nPerSpeaker

    def forward(self, data, label=None):
        outp = self.__S__(data.reshape(-1, data.size()[-1]))
        if label is None:
            return outp
        outp = outp.reshape(self.nPerSpeaker, -1, outp.size()[-1]).transpose(1, 0).squeeze(1)
        return self.__L__.forward(outp, label)


@pytest.fixture
def voxceleb_checkout(tmp_path):
    """A folder with loss/ge2e_ext.py holding the README's one-line plug-in file."""
    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "__init__.py").write_text("")
    (tmp_path / "loss" / "ge2e_ext.py").write_text(recipe("voxceleb_trainer"))
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n == "loss" or n.startswith("loss.")]:
        del sys.modules[name]


def test_voxceleb_trainer_recipe(voxceleb_checkout):
    assert len([line for line in recipe("voxceleb_trainer").splitlines()
                if line.strip() and not line.startswith("#")]) == 1
    # all of voxceleb_trainer's options reach LossFunction(**kwargs); most are not the loss's
    args = argparse.Namespace(trainfunc="ge2e_ext", nPerSpeaker=3, n_mels=40, nOut=32,
                              margin=0.1, scale=30, nClasses=5994, batch_size=8, max_frames=200,
                              optimizer="adam", model="ResNetSE34V2", encoder_type="SAP")
    net = SpeakerNetStandIn(**vars(args))
    assert net.__L__.test_normalize is True
    assert {"__L__.w", "__L__.b"} <= set(net.state_dict())  # voxceleb_trainer's names
    torch.manual_seed(1)
    speakers = torch.randn(8, 1, 40)
    # voxceleb_trainer's loader: (batch = speakers, nPerSpeaker, ...), transposed in training
    data = (speakers + 2.0 * torch.randn(8, 3, 40)).transpose(1, 0)
    label = torch.arange(8)
    loss, prec1 = net(data, label)
    # its loss/ge2e.py: mean cross-entropy of w * clamp(cos, 1e-6) + b (float64 loop reference)
    x = net.__S__(data.reshape(-1, 40)).reshape(3, 8, -1).transpose(1, 0).detach().double()
    w, b = net.__L__.w.detach().double(), net.__L__.b.detach().double()
    assert loss.item() == pytest.approx(ge2e_loss_reference(x, w, b).mean().item(), rel=1e-5)
    # prec1: percent of rows whose argmax (over the clamped similarities) is the own speaker
    cos = torch.stack([torch.stack([torch.stack([
        torch.clamp(F.cosine_similarity(
            x[j, i], (torch.cat([x[j, :i], x[j, i + 1:]]).mean(0) if k == j else x[k].mean(0)),
            dim=0), 1e-6) for k in range(8)]) for i in range(3)]) for j in range(8)])
    expected = 100.0 * (cos.argmax(-1) == torch.arange(8).view(8, 1)).double().mean()
    assert prec1.dim() == 0 and 0 < prec1.item() <= 100
    assert prec1.item() == pytest.approx(expected.item())
    loss.backward()  # its training loop: nloss.backward(), top1 += prec1.detach().cpu().item()
    assert net.__L__.w.grad is not None and net.__S__.weight.grad is not None
    prec1.detach().cpu().item()


def test_voxceleb_trainer_needs_two_per_speaker(voxceleb_checkout):
    net = SpeakerNetStandIn(trainfunc="ge2e_ext", nPerSpeaker=1, n_mels=40, nOut=16)
    with pytest.raises(ValueError, match="--nPerSpeaker 2 or more"):
        net(torch.randn(1, 6, 40), torch.arange(6))


def test_metric_learning_recipe():
    ns = run_recipe("metric_learning")
    embeddings, labels, loss = ns["embeddings"].detach(), ns["labels"], ns["loss"]
    # the same as the dense (N, M, D) loss of the unit rows grouped by label (loop
    # reference; pytorch-metric-learning's GE2ELoss normalises them first)
    unit = F.normalize(embeddings, dim=1)
    order = torch.argsort(labels, stable=True)
    dense = unit[order].reshape(4, 6, -1).double()
    expected = ge2e_loss_reference(dense, 10.0, -5.0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the accuracy from the loss's pass is the PyTorch path's similarity-matrix arg-max
    assert torch.equal(ns["accuracy"], top1_accuracy(unit, labels))
    # the optimizer stepped w and b as well as the model
    assert ns["loss_func"].w.item() != 10.0 and ns["loss_func"].b.grad is not None
    assert isinstance(ns["loss_func"], GE2ELoss)
