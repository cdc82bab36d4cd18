"""Frames of the images forming while a batch renders: latents to small JPEGs, for the status message.

Two decoders: ``latent2rgb``, a fixed linear map of SD 1.5's four latent channels to RGB (no weights, 1/8 size), and
``taesd``, a diffusers ``AutoencoderTiny`` (about 1.2M parameters for the real one, ~9% of one UNet step at 512 px).
The GPU thread runs only the decode of the images asked for, in one call, and moves the pixels to the CPU; resizing
and JPEG encoding run on a thread of their own, so the batch waits for neither.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

# diffusers exports its public names through a lazy module that pyright reads as private imports.
# pyright: reportPrivateImportUsage=false
from diffusers import AutoencoderTiny
from numpy.typing import NDArray
from PIL import Image

from bot.engine.loading import _DTYPE_KWARG  # pyright: ignore[reportPrivateUsage]
from bot.engine.protocol import PreviewOptions

log = logging.getLogger(__name__)

# SD 1.5's latents (as the UNet sees them, already scaled) to RGB in about [-1, 1]: the least-squares fit of the
# VAE's decoded colours to its latent channels, as ComfyUI's and InvokeAI's previews use. Rows: latent channels.
LATENT_RGB = (
    (0.3444, 0.1385, 0.0670),
    (0.1247, 0.4027, 0.1494),
    (-0.3192, 0.2513, 0.2103),
    (-0.1307, -0.1874, -0.7445),
)
LATENT_RGB_BIAS = (0.0, 0.0, 0.0)


class Previewer:
    """Decode chosen latents of a batch to pixels on the GPU thread, and encode them as JPEGs beside it."""

    def __init__(self, options: PreviewOptions, *, device: str, taesd: AutoencoderTiny | None = None) -> None:
        self.options = options
        # Whether a frame shows what the safety checker would withhold from the result (set by the worker when the
        # model has one): such a frame is never sent, so a preview never shows what the result will not.
        self.unsafe: Callable[[NDArray[np.uint8]], bool] | None = None
        self.device = device
        self.decoder = "taesd" if taesd is not None else "latent2rgb"
        self._taesd = taesd
        self._matrix = torch.tensor(LATENT_RGB, device=device)
        self._bias = torch.tensor(LATENT_RGB_BIAS, device=device)
        # One thread: a frame is a few milliseconds of PIL work, and frames of one batch go out in order.
        self._encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview")

    @classmethod
    def load(cls, options: PreviewOptions, *, device: str, dtype: torch.dtype = torch.float32) -> Previewer | None:
        """Return a previewer for the options (None when they are off); TAESD falls back to latent2rgb, saying why."""
        if not options.enabled:
            return None
        if options.decoder == "latent2rgb":
            return cls(options, device=device)
        try:
            taesd = AutoencoderTiny.from_pretrained(options.taesd, **{_DTYPE_KWARG: dtype})
        except Exception as error:  # not cached offline, no such folder, a corrupt file: previews still work
            log.warning(
                "Previews use latent2rgb (blurry, 1/8 size): preview.taesd %r could not be loaded (%s: %s). Let the "
                "worker reach the hub once, or download it (hf download madebyollin/taesd) and set preview.taesd to "
                'its folder; preview.decoder = "latent2rgb" silences this.',
                options.taesd,
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
            )
            return cls(options, device=device)
        assert isinstance(taesd, AutoencoderTiny)
        taesd.requires_grad_(False).eval()
        torch.nn.Module.to(taesd, torch.device(device))  # diffusers wraps ModelMixin.to in a way pyright misreads
        return cls(options, device=device, taesd=taesd)

    def decode(self, latents: torch.Tensor, indices: Sequence[int]) -> NDArray[np.uint8]:
        """Return the chosen images of a batch's latents as uint8 RGB pixels on the CPU: (images, height, width, 3).

        Runs on the GPU thread, in one call for all of them; latents are the UNet's (batch, 4, height/8, width/8).
        """
        chosen = latents[list(indices)]
        with torch.inference_mode():
            if self._taesd is not None:
                taesd = self._taesd
                decoded = taesd.decode(chosen.to(taesd.dtype) / taesd.config["scaling_factor"], return_dict=False)[0]
                assert isinstance(decoded, torch.Tensor)
                rgb = decoded.float().permute(0, 2, 3, 1)
            else:
                rgb = chosen.float().permute(0, 2, 3, 1) @ self._matrix + self._bias
            pixels = ((rgb * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            return pixels.cpu().numpy()

    def encode(self, pixels: NDArray[np.uint8]) -> concurrent.futures.Future[bytes]:
        """Encode one image's pixels as a JPEG whose longer side is ``max_side``, off the calling thread."""
        return self._encoder.submit(jpeg, pixels, self.options.max_side, self.options.quality)

    def send(self, pixels: NDArray[np.uint8], deliver: Callable[[bytes], None]) -> concurrent.futures.Future[None]:
        """Encode one image's pixels as ``encode`` does and hand the JPEG to ``deliver``, both off the calling thread,
        unless ``unsafe`` says the frame shows what the safety checker withholds; the future is done once it was
        delivered or dropped."""

        def run() -> None:
            try:
                if self.unsafe is not None and self.unsafe(pixels):
                    log.debug("A preview frame was flagged by the safety checker; not sent")
                    return
                deliver(jpeg(pixels, self.options.max_side, self.options.quality))
            except Exception:  # a lost frame is no reason to lose the batch
                log.exception("Encoding a preview frame failed")

        return self._encoder.submit(run)

    def close(self) -> None:
        self._encoder.shutdown(wait=True)


def jpeg(pixels: NDArray[np.uint8], max_side: int, quality: int) -> bytes:
    """Return pixels as a JPEG scaled so that its longer side is ``max_side``."""
    image = Image.fromarray(pixels)
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        # Up from latent2rgb's 1/8 size smoothly; down from TAESD's full size without aliasing.
        image = image.resize(size, Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.LANCZOS)
    output = io.BytesIO()
    image.save(output, format="JPEG", quality=quality)
    return output.getvalue()
