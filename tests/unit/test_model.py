"""Model structure, the momentum twin and the task's state discipline."""

import math

import pytest
import torch

from albef_fast.models.albef import ALBEF, MOMENTUM_MODULES
from albef_fast.models.presets import ModelConfig, get_preset
from albef_fast.task import PretrainTask

from tests.helpers import tiny_batch


@pytest.fixture
def task():
    torch.manual_seed(0)
    return PretrainTask(ALBEF(get_preset("albef_tiny")), queue_size=24)


def test_albef_base_has_the_reference_parameter_count():
    """REFERENCE §1.4: 209,937,725 trainable parameters (momentum copies excluded)."""
    with torch.device("meta"):
        model = ALBEF(get_preset("albef_base"))
    assert sum(p.numel() for p in model.parameters()) == 209_937_725
    assert sum(p.numel() for p in model.visual_encoder.parameters()) == 85_844_736
    assert model.visual_encoder.pos_embed.shape == (1, 257, 768)


def test_mlm_decoder_is_tied_to_word_embeddings(task):
    m = task.model
    assert m.mlm_head.weight is m.text_encoder.embeddings.word_embeddings.weight
    assert task.model_m.mlm_head.weight is task.model_m.text_encoder.embeddings.word_embeddings.weight
    assert task.model_m.mlm_head.weight is not m.mlm_head.weight


def test_momentum_twin_copies_the_paired_modules_only(task):
    twin = task.model_m
    assert not hasattr(twin, "itm_head") and not hasattr(twin, "temp")
    assert all(not p.requires_grad for p in twin.parameters())
    online = dict(task.model.named_parameters())
    for name, p in twin.named_parameters():
        assert name.split(".")[0] in MOMENTUM_MODULES
        assert torch.equal(p, online[name]) and p.data_ptr() != online[name].data_ptr()


def test_forward_changes_no_state_and_after_step_does(task):
    batch = tiny_batch(task.model.config)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    out = task(batch, alpha=0.4)
    out.loss.backward()
    for k, v in task.state_dict().items():
        assert torch.equal(v, before[k]), f"forward/backward changed {k}"
    with torch.no_grad():
        for p in task.model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-1e-2)  # stand-in optimizer step
        task.model.temp.fill_(0.9)
    task.after_step(out)
    assert task.queues.ptr.item() == 6
    torch.testing.assert_close(task.queues.image[:6], out.image_feat_m)
    torch.testing.assert_close(task.queues.text[:6], out.text_feat_m)
    assert task.model.temp.item() == pytest.approx(0.5)
    name = "visual_encoder.blocks.0.attn.qkv.weight"
    expected = 0.995 * before[f"model_m.{name}"] + 0.005 * task.model.get_parameter(name)
    torch.testing.assert_close(task.model_m.get_parameter(name), expected)


def test_initial_losses_sit_at_chance(task):
    """Random weights: ITM ~ ln 2 and MLM ~ ln V (REFERENCE §2 [verified]). ITC at initialisation
    depends on how alike the random encoders make all features, so it is not pinned here."""
    task.eval()  # no dropout
    out = task(tiny_batch(task.model.config), alpha=0.0)
    assert out.itm_loss.item() == pytest.approx(math.log(2), abs=0.1)
    assert out.mlm_loss.item() == pytest.approx(math.log(30522), abs=0.5)


def test_every_trainable_parameter_gets_a_finite_gradient(task):
    out = task(tiny_batch(task.model.config), alpha=0.4)
    out.loss.backward()
    missing = [n for n, p in task.model.named_parameters() if p.grad is None]
    # the [PAD] row is excluded from the embedding gradient but still reaches the tied decoder
    assert missing == []
    for n, p in task.model.named_parameters():
        assert torch.isfinite(p.grad).all(), n


def test_batch_of_one_trains_without_a_hard_negative(task):
    """B = 1 has no valid negative: the ITM loss is the positive pair's alone, never a crash."""
    task.eval()
    batch = tiny_batch(task.model.config, B=1)
    out = task(batch, alpha=0.4)
    assert torch.isfinite(out.loss)
    fused = task.model.fuse(task.model.encode_text(batch.text_ids, batch.text_mask), batch.text_mask,
                            task.model.encode_image(batch.image))
    positive = torch.nn.functional.cross_entropy(task.model.itm_logits(fused), torch.ones(1, dtype=torch.long))
    torch.testing.assert_close(out.itm_loss, positive)


def test_reset_momentum_copies_online_weights(task):
    with torch.no_grad():
        task.model.text_proj.weight.add_(1.0)
    assert not torch.equal(task.model_m.text_proj.weight, task.model.text_proj.weight)
    task.reset_momentum_()
    for p_m, p in zip(*task.momentum_pairs()):
        assert torch.equal(p_m, p)


def test_model_config_validation():
    with pytest.raises(ValueError, match="patch_size"):
        ModelConfig(image_size=250)
    with pytest.raises(ValueError, match="clamp range"):
        ModelConfig(temp=0.9)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("albef_huge")
