"""Your own training loop, logging checkpoints for lcsc-ops (the README's example, run by the tests)."""
import mlflow
import torch
from accelerate import Accelerator

from lcsc_ops import CheckpointLogger, ModelSpec
from lcsc_ops.evaluation.data import load_dataset
from lcsc_ops.models.diffusion import make_sampler

STEPS = 200
spec = ModelSpec(factory="lcsc_ops.models.unet:digits_unet",  # your own "module:callable" that builds the network
                 kwargs={"channels": 16}, sampler={"name": "ddim", "steps": 10, "timesteps": 1000},
                 dataset="digits", image_shape=(1, 8, 8))
accelerator = Accelerator(cpu=not torch.cuda.is_available())
model = spec.build()
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
loader = torch.utils.data.DataLoader(load_dataset("digits"), batch_size=128, shuffle=True, drop_last=True)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
diffusion_loss = make_sampler(spec.sampler).training_loss  # epsilon prediction on the sampler's noise schedule

with mlflow.start_run() as run, CheckpointLogger(spec, every=50, accelerator=accelerator) as ckpt:
    step = 0
    while step < STEPS:
        for images in loader:
            loss = diffusion_loss(model, images)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            ckpt.step(model, step)  # updates the EMA; logs raw + EMA every 50 steps (main process only)
            if step == STEPS:
                break
print(run.info.run_id)  # then: lcsc-ops optimize <this run id>
