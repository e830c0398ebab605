"""Every command surgery prints for the user to run next works when followed as printed: advise's
adapt and train lines carry the factory's consent, the data's split and flips, the comparison."""

from __future__ import annotations

import shlex
import warnings

import torch

import surgery
from fixtures.factory import SIZE, factory_and_digits

warnings.filterwarnings("ignore", category=UserWarning)


def test_advise_lines_work_as_printed_for_a_factory(cli, tmp_path, monkeypatch):
    arch, data, weights = factory_and_digits(tmp_path, 8)
    ckpt = tmp_path / "random.pth"
    torch.save(weights, ckpt)
    classes_only = data / "train"  # class folders without val/: the split must travel to train
    a = surgery.advise(ckpt, arch=arch, data=classes_only, val_split=0.25, input_size=SIZE, flip=False,
                       arch_kwargs={"width": 16})
    adapt, train = a.commands
    assert "--arch-kwargs '{\"width\": 16}'" in adapt and f"--input-size {SIZE}" in adapt
    assert "--val-split 0.25" in train and "--no-flip" in train and "--trust-code" in train
    assert ("--compare-scratch" in train) is (a.features != "better")
    monkeypatch.chdir(tmp_path)  # the lines name adapted/ and run/ in the current folder
    r = cli(*shlex.split(adapt)[1:])
    assert r.exit_code == 0, r.output
    r = cli(*shlex.split(train)[1:], "--epochs", 1, "--lr", 0.01, "--quiet")  # one epoch at a set lr: short
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "compare.json").is_file() is ("--compare-scratch" in train)
