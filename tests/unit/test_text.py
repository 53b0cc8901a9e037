"""Caption cleaning, tokenisation and MLM masking (REFERENCE §1.5, §2 step 10, §3.2)."""

import pytest
import torch

from albef_fast.data.captions import CLS_ID, MASK_ID, PAD_ID, build_tokenizer, pre_caption, tokenize
from albef_fast.data.masking import mask_tokens


@pytest.mark.parametrize("raw, clean", [
    ("A Dog, running! On the beach.", "a dog running on the beach"),
    ("well-known red/blue <person>  sits\n", "well known red blue person sits"),
    ("  \"quoted\" (paren) *star* #tag: semi; tilde~ ", "quoted paren star tag semi tilde"),
    ("...!!!", ""),
    (" ".join(f"w{i}" for i in range(40)), " ".join(f"w{i}" for i in range(30))),
])
def test_pre_caption(raw, clean):
    assert pre_caption(raw) == clean


def test_tokenizer_is_bert_base_uncased_without_sep():
    assert tokenize(["hello world"]) == [[CLS_ID, 7592, 2088]]  # bert-base-uncased ids, no [SEP]
    ids = tokenize(["the " * 60])[0]
    assert len(ids) == 25 and ids[0] == CLS_ID and set(ids[1:]) == {1996}  # 24 word pieces kept
    assert build_tokenizer().get_vocab_size() == 30522


def test_masking_statistics():
    """15 % of real non-[CLS] tokens selected; of those 80 % [MASK], 10 % random, 10 % unchanged."""
    g = torch.Generator().manual_seed(0)
    B, L = 4000, 30
    ids = torch.randint(1000, 30000, (B, L), generator=g)
    ids[:, 0] = CLS_ID
    ids[:, 20:] = PAD_ID
    masked, selected = mask_tokens(ids, g)
    assert not selected[:, 0].any() and not selected[:, 20:].any()
    assert torch.equal(masked[~selected], ids[~selected])
    n = selected[:, 1:20].numel()
    assert selected.sum().item() / n == pytest.approx(0.15, abs=0.005)
    sel_new, sel_old = masked[selected], ids[selected]
    is_mask = sel_new == MASK_ID
    kept = (sel_new == sel_old) & ~is_mask
    assert is_mask.float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert kept.float().mean().item() == pytest.approx(0.1 + 0.1 / 30522, abs=0.01)
    assert (~is_mask & ~kept).float().mean().item() == pytest.approx(0.1, abs=0.01)
    a, _ = mask_tokens(ids, torch.Generator().manual_seed(7))
    b, _ = mask_tokens(ids, torch.Generator().manual_seed(7))
    c, _ = mask_tokens(ids, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)  # a function of the generator alone
