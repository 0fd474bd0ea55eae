"""Which trainer the one entrypoint uses: optimum-neuron's on Trainium (the Neuron training image),
the Transformers Trainer elsewhere. Trainium is stood in for by fake modules: the choice is tested
here, the Neuron run itself only on Trainium."""

from __future__ import annotations

import importlib.machinery
import sys
import types

from training.config import TrainConfig
from training.train import on_trainium, trainer_classes


def _module(name: str, package: bool = False, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    module.__dict__.update(attributes)
    return module


def test_on_trainium_the_entrypoint_trains_with_optimum_neuron_in_bf16(monkeypatch):
    trainer = type("NeuronTrainer", (), {})
    arguments = type("NeuronTrainingArguments", (), {})
    monkeypatch.setitem(sys.modules, "torch_neuronx", _module("torch_neuronx"))
    monkeypatch.setitem(sys.modules, "optimum", _module("optimum", package=True))
    neuron = _module("optimum.neuron", NeuronTrainer=trainer, NeuronTrainingArguments=arguments)
    monkeypatch.setitem(sys.modules, "optimum.neuron", neuron)
    assert on_trainium()
    assert trainer_classes(TrainConfig(precision="fp32")) == (arguments, trainer, {"bf16": True})


def test_elsewhere_the_transformers_trainer_runs_on_the_cpu(monkeypatch):
    from transformers import Trainer, TrainingArguments

    monkeypatch.delitem(sys.modules, "torch_neuronx", raising=False)
    assert not on_trainium()
    monkeypatch.setenv("WORLD_SIZE", "2")
    arguments, trainer, device = trainer_classes(TrainConfig(precision="bf16"))
    assert (arguments, trainer) == (TrainingArguments, Trainer)
    assert device == {"bf16": True, "use_cpu": True, "ddp_backend": "gloo"}
