"""DINOv3 (Siméoni et al., 2508.10104): DINOv2's objective (methods/dinov2.py: DINO cls loss, iBOT
masked-patch loss, KoLeo, EMA teacher) with DINOv3's defaults, plus Gram anchoring.

Defaults (the official ssl_default_config.yaml facts): a separate iBOT head, 65,536 prototypes in
both heads, KoLeo weight 0.1, 2 global crops (scale 0.32-1) + 8 local crops of 96 px (0.05-0.32);
the recipe's model is timm's `vit_small_patch16_dinov3`.

Gram anchoring: a frozen `gram_teacher` backbone sees the 2 unmasked global crops; its patch
features X_G and the student's X_S (the masked global crops' patch tokens, the student forward
DINOv2 already runs), each L2-normalised along the channels, give the similarity matrices
X Xᵀ of each image's patches; the loss is their mean squared difference (the paper's
‖X_S X_Sᵀ − X_G X_Gᵀ‖²_F, as a mean), times `gram.loss_weight`, from the first iteration that
has a Gram teacher on. The Gram teacher is a copy of the EMA teacher's backbone taken before
iteration `gram.it_load_ema_teacher` (or a checkpoint's backbone, `gram.ckpt`, from the start),
refreshed from the EMA teacher before every iteration it >= it_first_update, it > 0, with it a
multiple of `gram.update_frequency`, at most `gram.max_updates` times (the official train.py).
It is no parameter of the optimizer (requires_grad False: no gradient,
no DDP sync) but a module of the state dict, with the `gram_active` buffer: a resume is exact.

With `gram.teacher_size` the Gram teacher sees each global crop's twin instead (the same box and
flip at that side, without colour distortions: the official gram_teacher_crops_size with
gram_teacher_no_distortions), and its patch features are resized to the student's grid (bicubic,
no antialiasing: the official global_teacher_resize_method and _antialias).

The high-resolution adaptation (`mixed_sizes` ...): each training step's crops at one choice of
sizes, drawn per step (registry.dino_view, data.samplers.MixedSizes); the method takes any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.methods.dinov2 import DINOv2, DINOv2Config
from ssl_vit.methods.init import init_backbone


@dataclass
class GramConfig:
    loss_weight: float = 1.0
    """Weight of the Gram loss (gram.loss_weight)."""
    normalized: bool = True
    """L2-normalise the patch features along the channels before the similarities."""
    img_level: bool = False
    """One similarity matrix per image over its patches; false (the official default,
    ssl_default_config.yaml): one over all the patches of the process's batch (never across
    processes; its Gram-anchoring recipe for ViT-7B sets true)."""
    remove_neg: Literal["none", "teacher", "both"] = "none"
    """Negative similarities set to 0: of the Gram teacher only, of both, or none."""
    it_load_ema_teacher: int = 0
    """The iteration before which the Gram teacher is copied from the EMA teacher, and from
    which the Gram loss counts (with `ckpt`: not copied, the loss from the start)."""
    ckpt: str = ""
    """A checkpoint whose (teacher) backbone is the Gram teacher from the start."""
    teacher_size: int = 0
    """The Gram teacher's crops: 0, the student's 2 global crops; else their undistorted twins
    of this side (crops.gram_teacher_crops_size), its features resized to the student's grid."""
    update_frequency: int = 50000
    """The Gram teacher is refreshed from the EMA teacher every this many iterations."""
    it_first_update: int = 0
    """The first iteration before which the Gram teacher may be refreshed."""
    max_updates: int = 0
    """At most this many refreshes (0: no limit; the official null)."""


@dataclass
class DINOv3Config(DINOv2Config):
    name: ClassVar[str] = "dinov3"
    ibot_separate_head: bool = True
    """A head of its own for the patch tokens (DINOv3's default)."""
    gram: GramConfig = field(default_factory=GramConfig)
    """Gram anchoring (`--method.gram.FIELD`)."""
    mixed_sizes: tuple[int, ...] = ()
    """The high-resolution adaptation (crops.global_crops_size as a list): each training step's
    global crops at one of these sides, drawn with mixed_ratios, the same on every process; ()
    = model.img_size at every step."""
    mixed_local_sizes: tuple[int, ...] = ()
    """The local crops' side that goes with each of mixed_sizes (crops.local_crops_size)."""
    mixed_teacher_sizes: tuple[int, ...] = ()
    """The Gram teacher's twins' side that goes with each (crops.gram_teacher_crops_size); () =
    gram.teacher_size at every step."""
    mixed_ratios: tuple[float, ...] = ()
    """The probability of each (crops.global_local_crop_pairs_ratios)."""

    def errors(self, cfg: Any) -> list[str]:
        e = DINOv2Config.errors(self, cfg)
        g = self.gram
        if g.loss_weight < 0:
            e.append(f"method.gram.loss_weight: must be >= 0, got {g.loss_weight}")
        if g.it_load_ema_teacher < 0 and not g.ckpt:
            e.append(
                "method.gram.it_load_ema_teacher: >= 0 without method.gram.ckpt (the Gram "
                f"teacher comes from one or the other), got {g.it_load_ema_teacher}"
            )
        if g.max_updates < 0:
            e.append(f"method.gram.max_updates: must be >= 0, got {g.max_updates}")
        if g.update_frequency < 1:
            e.append(f"method.gram.update_frequency: must be >= 1, got {g.update_frequency}")
        patch = cfg.model.patch_size  # 0: model.init's
        if g.teacher_size < 0 or (patch and g.teacher_size % patch):
            e.append(
                f"method.gram.teacher_size: 0 or a positive multiple of model.patch_size "
                f"({cfg.model.patch_size}), got {g.teacher_size}"
            )
        e += self.mixed_errors(cfg)
        if g.remove_neg not in ("none", "teacher", "both"):
            e.append(f"method.gram.remove_neg: none, teacher or both, got {g.remove_neg!r}")
        return e

    def mixed_errors(self, cfg: Any) -> list[str]:
        """The high-resolution adaptation's settings: one size of each kind per choice."""
        if not (self.mixed_sizes or self.mixed_local_sizes or self.mixed_ratios):
            if self.mixed_teacher_sizes:
                return ["method.mixed_teacher_sizes: needs method.mixed_sizes"]
            return []
        n, e = len(self.mixed_sizes), []
        for key in ("mixed_local_sizes", "mixed_ratios") + (
            ("mixed_teacher_sizes",) if self.mixed_teacher_sizes else ()
        ):
            if len(getattr(self, key)) != n:
                e.append(
                    f"method.{key}: one per method.mixed_sizes ({n}), got {len(getattr(self, key))}"
                )
        if any(r <= 0 for r in self.mixed_ratios):
            e.append(f"method.mixed_ratios: each > 0, got {self.mixed_ratios}")
        patch = cfg.model.patch_size
        sizes = self.mixed_sizes + self.mixed_local_sizes + self.mixed_teacher_sizes
        if any(s <= 0 or (patch and s % patch) for s in sizes):
            e.append(f"method.mixed_*sizes: positive multiples of model.patch_size ({patch})")
        if cfg.data.streaming or cfg.data.decode_on_device:
            e.append(
                "method.mixed_sizes: the choice of sizes per step rides on the sample order of "
                "a map-style dataset decoded on the CPU: not with data.streaming or "
                "data.decode_on_device"
            )
        return e


def gram_loss(
    student: Tensor,
    teacher: Tensor,
    normalized: bool = True,
    remove_neg: str = "none",
    img_level: bool = True,
) -> Tensor:
    """Patch features (B, N, D) of the student and of the Gram teacher -> the mean over the
    entries of (S Sᵀ - T Tᵀ)², per image (B matrices N x N) or over the batch's B N patches
    (`img_level` False); rows L2-normalised first (`normalized`); `remove_neg` "teacher": the
    teacher's negative similarities set to 0, "both": the student's too. float32."""
    with torch.autocast(student.device.type, enabled=False):
        s, t = student.float(), teacher.float().detach()
        if normalized:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        if not img_level:
            s, t = s.flatten(0, 1)[None], t.flatten(0, 1)[None]
        s_sim, t_sim = s @ s.transpose(-2, -1), t @ t.transpose(-2, -1)
        if remove_neg in ("teacher", "both"):
            t_sim = t_sim.clamp(min=0)
        if remove_neg == "both":
            s_sim = s_sim.clamp(min=0)
        return (s_sim - t_sim).square().mean()


class DINOv3(DINOv2):
    """DINOv2 + a frozen `gram_teacher` backbone and its loss."""

    def __init__(self, backbone: Backbone, cfg: DINOv3Config):
        super().__init__(backbone, cfg)
        no_drop = {k: v for k, v in backbone.timm_kwargs.items() if k != "drop_path_rate"}
        self.gram_teacher = Backbone(backbone.name, pos_interp="offset", **no_drop)
        self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
        self.gram_teacher.requires_grad_(False)
        if cfg.gram.ckpt:
            init_backbone(self.gram_teacher, cfg.gram.ckpt)
        self.register_buffer("gram_active", torch.tensor(float(self.gram_start() <= 0)))
        self.twin_sizes = cfg.mixed_teacher_sizes or (cfg.gram.teacher_size,)
        self.twins = 2 if cfg.gram.teacher_size or cfg.mixed_teacher_sizes else 0

    def init_from(self, checkpoint: str) -> list[str]:
        """DINOv2's, and the Gram teacher too (unless gram.ckpt names its own)."""
        taken = super().init_from(checkpoint)
        if not self.cfg.gram.ckpt:
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
            taken.append("Gram teacher")
        return taken

    def extra_losses(
        self, crops: list[Tensor], out: Any
    ) -> dict[str, tuple[Tensor | float, Tensor]]:
        """The Gram loss, weighted by gram.loss_weight once active (gram_active 1), else by 0."""
        g = self.cfg.gram
        seen = crops[-2:] if self.twins else crops[:2]
        if self.twins and seen[0].shape[-1] not in self.twin_sizes:
            raise ValueError(
                f"method.gram.teacher_size {self.twin_sizes}: the batch's last 2 crops are "
                f"{tuple(seen[0].shape[-2:])}, not the global crops' twins (registry.dino_crops)"
            )
        with torch.no_grad():
            t_out = self.gram_teacher(torch.cat(seen))
        student = out.tokens[:, out.num_prefix :]
        teacher = t_out.tokens[:, t_out.num_prefix :]
        if teacher.shape[1] != student.shape[1]:  # (2B, N_T, D) -> (2B, N_S, D)
            p = self.backbone.patch_size
            (h, w), (th, tw) = ((x.shape[-2] // p, x.shape[-1] // p) for x in (crops[0], seen[0]))
            grid = rearrange(teacher.float(), "b (h w) d -> b d h w", h=th, w=tw)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            teacher = rearrange(grid, "b d h w -> b (h w) d")
        loss = gram_loss(student, teacher, g.normalized, g.remove_neg, g.img_level)
        return {"gram_loss": (g.loss_weight * self.gram_active, loss)}

    def gram_event(self, it: int) -> str | None:
        """What happens to the Gram teacher before iteration `it` (0-based): "load" (copied from
        the EMA teacher at it_load_ema_teacher), "update" (a refresh), or None."""
        g = self.cfg.gram
        if not g.ckpt and it == g.it_load_ema_teacher:
            return "load"
        if it > 0 and it >= g.it_first_update and it % g.update_frequency == 0:
            first = -(-max(g.it_first_update, 1) // g.update_frequency) * g.update_frequency
            if not g.max_updates or (it - first) // g.update_frequency < g.max_updates:
                return "update"
        return None

    def gram_start(self) -> int:
        """The first iteration with a Gram teacher, and so with the Gram loss: 0 with gram.ckpt,
        else gram.it_load_ema_teacher (the official loss needs its teacher loaded)."""
        return 0 if self.cfg.gram.ckpt else self.cfg.gram.it_load_ema_teacher

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """DINOv2's EMA and temperature, then the Gram teacher and loss of iteration step + 1."""
        super().after_optimizer_step(step, total_steps)
        if self.gram_event(step + 1) is not None:
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
        self.gram_active.fill_(float(step + 1 >= self.gram_start()))
