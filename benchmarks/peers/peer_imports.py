"""Import the parts of learn2learn and easyfsl that the comparison uses, without torchvision.

``import learn2learn`` runs ``learn2learn/__init__.py``, which imports every subpackage,
``learn2learn.vision`` (torchvision) and ``learn2learn.gym`` (gym) among them; likewise
``easyfsl.methods`` and ``easyfsl.datasets`` import their ResNet and image-folder modules, which
need torchvision. No torchvision on the package index imports beside a CPU build of torch 2.13,
and none of these modules is used here. So the package whose ``__init__`` pulls them in is
registered as a bare package (its real folder as ``__path__``), and the modules the benchmark
needs are imported from it as usual: their code, the code that is timed, is the released code,
unchanged. Nothing is replaced by a stand-in; only the package ``__init__`` files are not run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import SimpleNamespace


def _bare_package(name: str, **exports: str) -> types.ModuleType:
    """Register package ``name`` without running its ``__init__``; ``exports`` maps an attribute
    the package's ``__init__`` would have re-exported to the submodule that defines it."""
    if name in sys.modules:
        return sys.modules[name]
    parent, _, child = name.rpartition(".")
    spec = importlib.util.find_spec(name)  # imports the parent package (not this one)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"package {name} is not installed (run benchmarks/peers/setup_env.sh)")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__file__ = spec.origin
    module.__package__ = name
    sys.modules[name] = module
    if parent:
        setattr(sys.modules[parent], child, module)
    for attr, sub in exports.items():
        setattr(module, attr, getattr(importlib.import_module(f"{name}.{sub}"), attr))
    return module


def learn2learn() -> SimpleNamespace:
    """``MAML`` (algorithms), ``PrototypicalClassifier`` (nn), ``MetaDataset``, ``TaskDataset``,
    ``transforms`` (data, compiled from the Cython sources) and ``partition_task``, and the version."""
    from importlib.metadata import version

    _bare_package("learn2learn")
    algorithms = importlib.import_module("learn2learn.algorithms")
    data = importlib.import_module("learn2learn.data")
    nn = importlib.import_module("learn2learn.nn")
    return SimpleNamespace(MAML=algorithms.MAML, PrototypicalClassifier=nn.PrototypicalClassifier,
                           MetaDataset=data.MetaDataset, TaskDataset=data.TaskDataset, transforms=data.transforms,
                           partition_task=data.partition_task,
                           compiled=data.task_dataset.__file__.endswith(".so"), version=version("learn2learn"))


def easyfsl() -> SimpleNamespace:
    """``PrototypicalNetworks``, ``TaskSampler`` (with ``make_task_sampler`` to build one) and
    ``FewShotDataset``, and the version."""
    from importlib.metadata import version

    importlib.import_module("easyfsl")  # its __init__ only sets the version
    _bare_package("easyfsl.methods")
    _bare_package("easyfsl.datasets", FewShotDataset="few_shot_dataset")
    protonet = importlib.import_module("easyfsl.methods.prototypical_networks")
    sampler = importlib.import_module("easyfsl.samplers.task_sampler")

    def make_task_sampler(*args, **kwargs):
        """``TaskSampler(*args, **kwargs)``. easyfsl 1.5.0's constructor calls
        ``Sampler.__init__(data_source=None)``, an argument torch dropped (2.13's ``Sampler`` has
        no ``__init__``); for the constructor call only, ``Sampler`` gets back the do-nothing
        ``__init__(data_source=None)`` of older releases. Sampling itself runs unchanged."""
        from torch.utils.data import Sampler

        old = Sampler.__dict__.get("__init__")
        Sampler.__init__ = lambda self, data_source=None: None  # type: ignore[method-assign]
        try:
            return sampler.TaskSampler(*args, **kwargs)
        finally:
            if old is None:
                del Sampler.__init__
            else:
                Sampler.__init__ = old  # type: ignore[method-assign]

    return SimpleNamespace(PrototypicalNetworks=protonet.PrototypicalNetworks, TaskSampler=sampler.TaskSampler,
                           make_task_sampler=make_task_sampler,
                           FewShotDataset=sys.modules["easyfsl.datasets"].FewShotDataset, version=version("easyfsl"))


def higher() -> SimpleNamespace:
    """``innerloop_ctx`` (higher imports no torchvision) and the version."""
    from importlib.metadata import version

    import higher as h

    return SimpleNamespace(innerloop_ctx=h.innerloop_ctx, version=version("higher"))
