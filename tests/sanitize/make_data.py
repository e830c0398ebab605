"""Write the checkpoints under data/ with the libraries that make them in the wild (numpy, omegaconf).

The files are committed, so the tests need neither library; run this again only to change them:

    pip install --no-deps --target /tmp/omega omegaconf antlr4-python3-runtime==4.9.3 lightning lightning-utilities
    PYTHONPATH=/tmp/omega:. python tests/sanitize/make_data.py [FILE ...]   # all files, or the ones named

Each file is a few KB: a tiny model's state dict and the metadata that makes torch.load(weights_only=True)
refuse the file. tests/sanitize/data/README.md records the versions that wrote them.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data"


def _model() -> collections.OrderedDict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    return net.state_dict()


def _optimizer(sd: dict) -> dict:
    params = [torch.nn.Parameter(v.clone()) for v in sd.values() if v.is_floating_point()]
    opt = torch.optim.Adam(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def lightning_namespace() -> dict:
    sd = _model()
    return {"epoch": np.int64(3), "global_step": np.int64(120), "pytorch-lightning_version": "2.4.0",
            "state_dict": collections.OrderedDict((f"model.{k}", v) for k, v in sd.items()),
            "hyper_parameters": argparse.Namespace(lr=0.01, layers=[4, 3, 2], data=pathlib.PosixPath("/data/train"),
                                                   seed=np.int32(7), mean=np.array([0.5, 0.25], dtype=np.float32)),
            "optimizer_states": [_optimizer(sd)], "lr_schedulers": [{"last_epoch": 3, "_step_count": 4}],
            "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.875), "monitor": "val_acc"}}}


def lightning_omegaconf() -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"name": "resnet18", "layers": [2, 2, 2, 2], "dropout": None},
                            "optim": {"lr": 0.1, "warmup_lr": "${optim.lr}", "nesterov": True},
                            "data": {"root": "???", "sizes": [[32, 32], [64, 64]]}, "seed": 3})
    ckpt = lightning_namespace()
    ckpt["hyper_parameters"] = cfg
    ckpt["hparams_name"] = "cfg"
    return ckpt


def lightning_attributedict() -> dict:
    """Lightning's own layout (admet-ai's chemprop models): save_hyperparameters() stores an
    AttributeDict, nested ones inside, next to a class reference and a module instance."""
    from lightning.fabric.utilities.data import AttributeDict

    Thing.__module__ = "made_up_module"
    sys.modules["made_up_module"] = sys.modules[__name__]
    ckpt = lightning_namespace()
    ckpt["hyper_parameters"] = AttributeDict(
        lr=np.float64(0.001), layers=[4, 3, 2], activation=torch.nn.ReLU(), cls=torch.nn.Linear,
        predictor=AttributeDict(n_tasks=1, dropout=0.0, output_transform=Thing()))
    return ckpt


def fairseq() -> dict:
    args = argparse.Namespace(arch="transformer_tiny", lr=[0.0005], max_tokens=4096, fp16=False,
                              task="translation", save_dir="checkpoints", seed=1)
    return {"args": args, "model": _model(),
            "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": np.float64(3.25)}, "num_updates": np.int64(500)}],
            "extra_state": {"train_iterator": {"epoch": 2, "iterations_in_epoch": np.int64(17), "shuffle": True},
                            "metrics": {"loss": np.float32(2.5), "ppl": np.float64(5.65), "wps": np.float16(1000.0),
                                        "ok": np.bool_(True)},
                            "previous_training_time": np.float64(12.5), "val_loss": np.float32(3.1)}}


def numpy_values() -> dict:
    kinds = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
             "uint64", "bool", "complex64", "complex128"]
    rng = np.random.default_rng(0)
    arrays = {k: (rng.standard_normal((2, 3)) * 10).astype(k) for k in kinds}
    scalars = {k: np.dtype(k).type(arrays[k].flat[1]) for k in kinds}
    return {"weights": torch.arange(6.0).reshape(2, 3), "arrays": arrays, "scalars": scalars,
            "dtypes": [np.dtype(k) for k in ("float32", "int64", "bool")],
            "fortran": np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
            "big_endian": np.arange(5, dtype=">f4"), "zero_d": np.array(2.5), "empty": np.zeros((0, 3), np.float32),
            "text": np.str_("hello"), "object_array": np.array([{"a": 1}, None], dtype=object),
            "counts": collections.defaultdict(int, {"a": 2, "b": 5}), "tags": {"x", "y"}, "frozen": frozenset({1, 2})}


class Thing:
    """A class of a module the reading side cannot import: its instance is dropped, never built."""

    def __init__(self) -> None:
        self.value = 42


def helper() -> None:
    """A function a checkpoint references (pickled by name)."""


def unknown_object() -> dict:
    Thing.__module__ = helper.__module__ = "made_up_module"
    sys.modules["made_up_module"] = sys.modules[__name__]
    return {"state_dict": {"w": torch.ones(2)}, "thing": Thing(), "hook": helper, "kept": [1, 2.0, "three"]}


FILES = {"lightning_namespace.ckpt": lightning_namespace, "lightning_omegaconf.ckpt": lightning_omegaconf,
         "lightning_attributedict.ckpt": lightning_attributedict,
         "fairseq.pt": fairseq, "numpy_values.pt": numpy_values, "unknown_object.pt": unknown_object}


def main() -> None:
    import omegaconf

    DATA.mkdir(exist_ok=True)
    for name, make in FILES.items():
        if sys.argv[1:] and name not in sys.argv[1:]:
            continue
        torch.save(make(), DATA / name)
        print(f"{name}: {(DATA / name).stat().st_size} bytes")
    print(f"torch {torch.__version__}, numpy {np.__version__}, omegaconf {omegaconf.__version__}, "
          f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
