"""One multi-process test: LatentEBMPrior trains two steps with ddp_spawn on 2 CPU processes."""
import torch
from _data import fit_steps

from lebm_zoo import LatentEBMPrior


def test_two_steps_with_ddp_spawn_on_two_cpu_processes(tmp_path):
    torch.manual_seed(0)
    model = LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=3, posterior_steps=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    trainer = fit_steps(model, x, 2, tmp_path, batch_size=4, shuffle=False, devices=2, strategy="ddp_spawn")
    assert trainer.state.finished
    # the spawned processes' weights come back to this process: both nets were updated
    after = model.state_dict()
    assert not torch.equal(before["generator.net.0.weight"], after["generator.net.0.weight"])
    assert not torch.equal(before["energy_net.net.0.weight"], after["energy_net.net.0.weight"])
    assert all(torch.isfinite(v).all() for v in after.values())
