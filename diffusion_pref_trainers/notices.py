"""Drop two import-time notices of other libraries that this package's users can do nothing about.

Both are logged while diffusers and peft import their optional backends, so there is no call of ours to
change: transformers 5 without torchvision resolves diffusers' `from transformers import CLIPImageProcessor`
to the PIL class (the behaviour we want) with a warning, and bitsandbytes on an AVX512-BF16 CPU reports that the
optional `kernels` package is missing. Each filter matches only its one message on its one logger, and a logging
filter needs no import of the library, so the package import stays light.
"""

from __future__ import annotations

import logging

# Logger name -> the start of the one message dropped from it.
_DROPPED = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropMessage(logging.Filter):
    """Rejects records whose message contains `text`; every other record passes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def drop_known_import_notices() -> None:
    """Install the filters once (idempotent: a second call adds nothing)."""
    for name, text in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
