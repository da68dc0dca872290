"""What an encoder returns when a head asks for more than one feature map: :class:`EncoderOutput`, named dense maps
plus a pooled vector (docs "Methods": encoder outputs), and :class:`FeatureRequest`, what a head asks for.

A head that needs only the encoder's main map (``"out"``; ALPNet, PANet, ADNet) gets a plain ``[B, C, h, w]`` tensor,
exactly as before the bundle existed; a head that needs other maps or the pooled vector (Q-Net, RPT) gets an
:class:`EncoderOutput`. Map names: ``"out"`` is every encoder's main map (what ``forward`` returns); ``"aux"`` is a
second scale where the encoder has one: for ``resnet101_qnet`` the coarser stride-8 layer4 map reduced to 512 channels
(``"out"`` being the stride-4 layer3 map, Q-Net's ``down2``/``down3``), for a ViT the middle block's patch tokens (final
LayerNorm applied) upsampled to twice ``feature_size``. ``pooled``: the global average of ResNet's layer4, or of a
ViT's final patch tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAIN_MAP = "out"
AUX_MAP = "aux"


@dataclass(frozen=True)
class FeatureRequest:
    """The encoder outputs a head uses: ``maps`` (names, :data:`MAIN_MAP` first by convention) and whether it needs
    the ``pooled`` vector. The default request, the main map alone, is served as a plain tensor."""

    maps: tuple[str, ...] = (MAIN_MAP,)
    pooled: bool = False

    @property
    def plain(self) -> bool:
        """True when the main map alone is asked for (the encoder's ``forward`` output, no bundle)."""
        return self.maps == (MAIN_MAP,) and not self.pooled


@dataclass(frozen=True)
class EncoderOutput:
    """Named feature maps ``{name: [B, C_n, h_n, w_n]}`` and a pooled vector ``[B, D]`` (or ``None``) of one batch.

    Indexing with an int, a slice, a bool mask or an index tensor selects the same images of every map and of the
    pooled vector (an int drops the batch axis, as for a tensor); :meth:`cat` and :meth:`stack` join bundles as
    ``torch.cat``/``torch.stack`` join tensors. Instances are never modified.
    """

    maps: dict[str, torch.Tensor]
    pooled: torch.Tensor | None = None

    def __getitem__(self, index: object) -> EncoderOutput:
        return EncoderOutput({k: v[index] for k, v in self.maps.items()},  # type: ignore[index]
                             None if self.pooled is None else self.pooled[index])  # type: ignore[index]

    def __len__(self) -> int:
        return int(next(iter(self.maps.values())).shape[0])

    @property
    def main(self) -> torch.Tensor:
        """The main map (``"out"``)."""
        return self.maps[MAIN_MAP]

    @property
    def device(self) -> torch.device:
        return next(iter(self.maps.values())).device

    def float(self) -> EncoderOutput:
        """Every tensor as float32 (the same object's tensors when they already are)."""
        return self.apply(lambda t: t.float())

    def apply(self, fn) -> EncoderOutput:  # noqa: ANN001  (Callable[[Tensor], Tensor])
        """A bundle with ``fn`` applied to every map and to the pooled vector (e.g. ``Tensor.clone``)."""
        return EncoderOutput({k: fn(v) for k, v in self.maps.items()}, None if self.pooled is None else fn(self.pooled))

    @staticmethod
    def cat(parts: Sequence[EncoderOutput]) -> EncoderOutput:
        """``torch.cat`` of the batches of ``parts`` (same keys), along the batch axis."""
        return EncoderOutput._join(parts, torch.cat)

    @staticmethod
    def stack(parts: Sequence[EncoderOutput]) -> EncoderOutput:
        """``torch.stack`` of single-image bundles (``bundle[i]``) into one batch."""
        return EncoderOutput._join(parts, torch.stack)

    @staticmethod
    def _join(parts: Sequence[EncoderOutput], fn) -> EncoderOutput:  # noqa: ANN001
        first = parts[0]
        maps = {k: fn([p.maps[k] for p in parts]) for k in first.maps}
        pooled = None if first.pooled is None else fn([p.pooled for p in parts])  # type: ignore[misc]
        return EncoderOutput(maps, pooled)


Features = torch.Tensor | EncoderOutput
"""What a head receives: the main map as a tensor (:attr:`FeatureRequest.plain`) or a bundle."""


def join(parts: Sequence[Features], stack: bool = False) -> Features:
    """``torch.cat`` (or ``torch.stack``) of tensors, or :meth:`EncoderOutput.cat` (``stack``) of bundles."""
    if isinstance(parts[0], EncoderOutput):
        return EncoderOutput.stack(parts) if stack else EncoderOutput.cat(parts)  # type: ignore[arg-type]
    return torch.stack(parts) if stack else torch.cat(parts)  # type: ignore[arg-type]
