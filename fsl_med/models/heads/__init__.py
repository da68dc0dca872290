"""Few-shot heads, one module per head, registered by name (``model.head.name``); adding a head is one module here,
its import below and its config section (:class:`fsl_med.config.HeadConfig`, :data:`fsl_med.config.HEAD_DEFAULTS`).
The docs page "Methods" shows a worked example (Adding a head)."""

from fsl_med.models.heads import alp, panet, adnet, qnet, rpt  # noqa: F401, I001  (registration, in this order)
from fsl_med.models.heads.base import FewShotHead
from fsl_med.models.heads.registry import create_head, get_head_class, list_heads, register_head

__all__ = ["FewShotHead", "create_head", "get_head_class", "list_heads", "register_head"]
