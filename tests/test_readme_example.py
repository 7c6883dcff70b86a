"""The "Adding a model" example (README and docs/adding_a_model.md, the same code) runs as written: subclass, train a
step, sample, checkpoint round trip."""
import re
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import lebm_zoo

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGE = ROOT / "docs" / "adding_a_model.md"


def _example(path: Path) -> str:
    text = path.read_text()
    section = text[text.index("# Adding a model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_adding_a_model_example(tmp_path):
    code = _example(PAGE)
    assert _example(README) == code  # the README shows the page's example
    ns: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), ns)
    cls = ns["MyDataSpaceEBM"]
    model = cls(n_steps=5)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    w0 = model.f[1].weight.clone()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=4))
    assert trainer.global_step == 2 and not torch.equal(w0, model.f[1].weight)
    s = model.sample(3)
    assert s.shape == (3, 1, 28, 28) and s.min() >= -1 and s.max() <= 1
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    # the class lives in the exec'd namespace, not an importable module: check the stored record instead
    assert torch.load(path, weights_only=True)["lebm_zoo"]["class_path"].endswith("MyDataSpaceEBM")
    assert isinstance(model, lebm_zoo.EBMModule)
