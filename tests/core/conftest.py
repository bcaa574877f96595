"""Fixtures of the core tests: hand-written key lists of foreign checkpoint layouts."""
import pytest

from localmim.core.state import vit_encoder_shapes


def _mae_shapes(spec, decoder=True, dd=24):
    """MAE key list (facebookresearch/mae models_mae.py names): name -> shape for ViT `spec`; with
    `decoder`, a decoder of width `dd` (the head and one decoder block's first keys only)."""
    d, p, n = spec.embed_dim, spec.patch_size, spec.num_patches
    out = dict(vit_encoder_shapes(spec, branch_norms=False))
    out.update({"norm.weight": (d,), "norm.bias": (d,)})
    if decoder:
        out.update({"mask_token": (1, 1, dd), "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
                    "decoder_pos_embed": (1, 1 + n, dd), "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                    "decoder_pred.weight": (p * p * 3, dd), "decoder_pred.bias": (p * p * 3,),
                    "decoder_blocks.0.norm1.weight": (dd,), "decoder_blocks.0.attn.qkv.weight": (3 * dd, dd)})
    return out


@pytest.fixture
def mae_shapes():
    """Factory: mae_shapes(spec, decoder=True, dd=24) -> {MAE key: shape}."""
    return _mae_shapes
