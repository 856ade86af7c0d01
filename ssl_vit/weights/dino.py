"""Official DINO files (`dino_*_pretrain.pth`: the teacher backbone; training `checkpoint.pth`:
`student` under `module.backbone.`, `teacher` under `backbone.`): timm's ViT names once the
wrappers are stripped; the DINO head (`head.*`) is method state."""

from __future__ import annotations

from ssl_vit.weights.family import Family

FAMILY = Family("dino", dropped=r"^head\.")
