"""One training step on a GPU: bf16 autocast for the encoders, fp32 for the momentum model, the queues
and the optimizer state; fp32 CUDA agrees with fp32 CPU."""

import pytest
import torch

from albef_fast.config import OptimConfig
from albef_fast.models.albef import ALBEF
from albef_fast.models.presets import get_preset
from albef_fast.task import PretrainTask
from albef_fast.train.optim import build_optimizer

from tests.helpers import tiny_batch

pytestmark = pytest.mark.gpu


def test_bf16_step_keeps_momentum_state_fp32():
    torch.manual_seed(0)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=48).cuda()
    opt = build_optimizer(task.model, OptimConfig())
    batch = tiny_batch(task.model.config, B=8).to("cuda")
    before = task.model_m.visual_encoder.pos_embed.clone()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = task(batch, alpha=0.4)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        task.after_step(out)
    assert torch.isfinite(out.loss)
    assert out.image_feat_m.dtype == torch.float32 and task.queues.ptr.item() == 24
    torch.testing.assert_close(task.queues.image[16:24], out.image_feat_m)
    # the EMA moved the momentum weights (0.005 steps survive in fp32; in bf16 many would round away)
    assert not torch.equal(task.model_m.visual_encoder.pos_embed, before)
    assert task.model_m.visual_encoder.pos_embed.dtype == torch.float32


def test_fp32_cuda_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    task = PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=48).eval()  # no dropout
    batch = tiny_batch(task.model.config, B=8)
    torch.manual_seed(1)
    cpu = task(batch, alpha=0.4)
    task = task.cuda()
    torch.manual_seed(1)
    gpu = task(batch.to("cuda"), alpha=0.4)
    # hard negatives are drawn from different generators; ITC and MLM do not depend on them
    for name in ("itc_loss", "mlm_loss"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-4, atol=1e-5)
