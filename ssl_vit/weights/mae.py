"""Official MAE files (`mae_pretrain_vit_*.pth`, `*_full.pth`, `mae_visualize_*.pth`, training
`checkpoint-*.pth`): `{"model": state}` in timm's ViT names; the mask token (1, 1, D) and the
decoder are method state."""

from __future__ import annotations

from ssl_vit.weights.family import Family

FAMILY = Family("mae", dropped=r"^mask_token$|^decoder_")
