"""MAE (He et al., 2111.06377): mask 75% of the patches, encode the rest, regress the masked pixels.

The encoder is the shared `Backbone` run on the kept tokens only; the decoder keeps the official
attribute names (`mask_token`, `decoder_embed`, `decoder_pos_embed`, `decoder_blocks`,
`decoder_norm`, `decoder_pred`) so the official `*_full.pth` checkpoints map onto it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.config import field_errors
from ssl_vit.methods.init import init_backbone, load_part, method_tensors
from ssl_vit.methods.protocol import Method
from ssl_vit.ops import patchify, random_masking, sincos_pos_embed_2d, unpatchify
from ssl_vit.optim import param_groups
from ssl_vit.weights import CheckpointError


@dataclass
class MAEConfig:
    name: ClassVar[str] = "mae"
    mask_ratio: float = 0.75
    """Fraction of patches removed from the encoder's input."""
    decoder_dim: int = 512
    """Token width of the decoder."""
    decoder_depth: int = 8
    """Number of decoder transformer blocks."""
    decoder_heads: int = 16
    """Attention heads per decoder block."""
    decoder_mlp_ratio: float = 4.0
    """Decoder MLP hidden width as a multiple of decoder_dim."""
    norm_pix_loss: bool = True
    """Regress each patch normalised by its own mean and std (the paper's recipes)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas used to train this method."""

    def errors(self, cfg: Any) -> list[str]:
        """Every invalid value, each message naming its key; `cfg` is the whole run Config."""
        e = []
        if not 0 < self.mask_ratio < 1:
            e.append(f"method.mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        else:
            patch = cfg.model.resolved_patch_size()
            if patch and cfg.model.img_size > 0 and cfg.model.img_size % patch == 0:
                num_patches = (cfg.model.img_size // patch) ** 2
                if int(num_patches * (1 - self.mask_ratio)) < 1:
                    e.append(
                        f"method.mask_ratio: {self.mask_ratio} keeps no patch of the "
                        f"{num_patches} patches of a {cfg.model.img_size}px image"
                    )
        e += field_errors(self, "method", {">= 1": "decoder_dim decoder_depth decoder_heads"})
        if self.decoder_dim >= 1 and self.decoder_heads >= 1:
            if self.decoder_dim % self.decoder_heads:
                e.append(
                    f"method.decoder_dim: {self.decoder_dim} is not divisible by "
                    f"method.decoder_heads {self.decoder_heads}"
                )
            if self.decoder_dim % 4:
                e.append(
                    f"method.decoder_dim: must be divisible by 4 (2-D sin-cos position "
                    f"embedding), got {self.decoder_dim}"
                )
        rules = {"positive": "decoder_mlp_ratio", "each in [0, 1)": "betas"}
        return e + field_errors(self, "method", rules)


def patch_mean_std(patches: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch mean and std, each (B, L, 1), of patches (B, L, P) for the norm-pix target.

    std = (var + 1e-6) ** 0.5 with the unbiased `.var()`, exactly as the official code.
    """
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5


class MAE(nn.Module, Method):
    """Masked autoencoder: `backbone` is the encoder (exported after training) + our decoder."""

    def __init__(self, backbone: Backbone, cfg: MAEConfig):
        super().__init__()
        if backbone.num_prefix_tokens != 1 or backbone.pos_embed is None or backbone.no_embed_class:
            raise ValueError(
                "MAE needs a backbone with a cls token, no registers, and a position "
                "embedding that includes the cls position"
            )
        self.backbone = backbone
        self.cfg = cfg
        dim, dec, p = backbone.embed_dim, cfg.decoder_dim, backbone.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_embed = nn.Linear(dim, dec)
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, 1 + backbone.num_patches, dec), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(
                dec,
                cfg.decoder_heads,
                cfg.decoder_mlp_ratio,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.decoder_pred = nn.Linear(dec, p * p * backbone.in_chans)
        self._init_weights()

    @torch.no_grad()
    def _set_pos_embed(self) -> None:
        """Encoder and decoder position embeddings: fixed 2-D sin-cos of the grid, never learned."""
        grid = self.backbone.grid_size
        enc_pos = self.backbone.pos_embed
        enc_pos.copy_(sincos_pos_embed_2d(enc_pos.shape[-1], *grid, cls_token=True)[None])
        enc_pos.requires_grad_(False)
        self.decoder_pos_embed.copy_(
            sincos_pos_embed_2d(self.cfg.decoder_dim, *grid, cls_token=True)[None]
        )

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The paper's init: fixed sin-cos positions, xavier Linear/patch embed, tokens std 0.02."""
        self._set_pos_embed()
        w = self.backbone.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.backbone.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_from(self, checkpoint: str) -> list[str]:
        """The encoder from `checkpoint`'s backbone, and the mask token and decoder when it has
        them (official `_full` files, our MAE runs; its decoder must match method.decoder_*).
        Both position embeddings stay the fixed sin-cos of this grid, as MAE's code builds them
        for any image size."""
        init_backbone(self.backbone, checkpoint)
        tensors = method_tensors(checkpoint)
        decoder = {k: v for k, v in tensors.items() if k.startswith("decoder_")}
        taken = ["encoder"]
        if "mask_token" in tensors and decoder:
            decoder = {k: v for k, v in decoder.items() if k != "decoder_pos_embed"}
            for part in ("decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred"):
                load_part(getattr(self, part), decoder, f"{part}.", checkpoint)
            token = tensors["mask_token"]
            if token.shape != self.mask_token.shape:
                raise CheckpointError(
                    f"{checkpoint}: mask_token {tuple(token.shape)} does not fit "
                    f"{tuple(self.mask_token.shape)} (method.decoder_dim)"
                )
            with torch.no_grad():
                self.mask_token.copy_(token)
            taken.append("decoder")
        self._set_pos_embed()
        return taken

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """MAE's main_pretrain.py: timm's add_weight_decay with no names to skip, so the cls and
        mask tokens decay (the sin-cos position embeddings are frozen, in no group)."""
        return param_groups(self, weight_decay)

    def forward_loss(self, images: Tensor, noise: Tensor | None = None) -> dict[str, Tensor]:
        """Mask, encode the kept patches, decode all, and score the masked ones.

        images (B, C, H, W) at the configured size; noise (B, L) fixes the mask (else drawn).
        Returns loss (scalar), pred (B, L, p*p*C), mask (B, L) 1 = removed, ids_restore (B, L).
        """
        b, p = images.shape[0], self.backbone.patch_size
        num_patches = (images.shape[-2] // p) * (images.shape[-1] // p)
        ids_keep, mask, ids_restore = random_masking(
            b, num_patches, self.cfg.mask_ratio, images.device, noise
        )
        latent = self.backbone(images, ids_keep=ids_keep).tokens  # (B, 1 + K, D)

        x = self.decoder_embed(latent)
        mask_tokens = self.mask_token.expand(b, num_patches - ids_keep.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # kept first, in shuffled order
        patches = torch.gather(
            patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        )
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]

        target = patchify(images, p)
        if self.cfg.norm_pix_loss:
            mean, std = patch_mean_std(target)
            target = (target - mean) / std
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L) per-patch MSE
        loss = (loss * mask).sum() / mask.sum()
        return {"loss": loss, "pred": pred, "mask": mask, "ids_restore": ids_restore}

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """batch["images"] (B, C, H, W); optional batch["noise"] (B, L) fixes the mask."""
        return {"loss": self.forward_loss(batch["images"], batch.get("noise"))["loss"]}

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.training_step(batch)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W): visible patches from the input, masked ones predicted.

        Under norm_pix_loss predictions are de-normalised with each patch's own input mean/std,
        as the official demo does; the output is in the same (normalised-input) space as `images`.
        """
        out = self.forward_loss(images, noise)
        p = self.backbone.patch_size
        target = patchify(images, p)
        pred = out["pred"].to(target.dtype)
        if self.cfg.norm_pix_loss:
            mean, std = patch_mean_std(target)
            pred = pred * std + mean
        pasted = torch.where(out["mask"].bool().unsqueeze(-1), pred, target)
        return unpatchify(pasted, p, images.shape[-2] // p, images.shape[-1] // p)
