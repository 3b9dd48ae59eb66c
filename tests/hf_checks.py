"""Checks of moekit models against transformers' that several test files share."""
import torch


def assert_left_padded_logits_equal(model, hf_model, ids, padding: int = 4):
    """The second row of ``ids`` left-padded by ``padding`` tokens: transformers with its
    attention mask and positions, moekit with its token mask, agree on the real tokens."""
    mask = torch.ones(ids.shape, dtype=torch.bool)
    mask[1, :padding] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    expected = hf_model(ids, attention_mask=mask.long(), position_ids=positions).logits
    torch.testing.assert_close(model(ids, mask=mask).logits[mask], expected[mask],
                               rtol=1e-4, atol=1e-5)
