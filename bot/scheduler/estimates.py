"""How long GPU work takes, as measured: what the scheduler's places in line and estimates are computed from.

Each settings' seconds per image is a moving average over the batches rendered with them, so it includes what
batching gains; settings not rendered yet fall back on the seconds per pixel-step of all batches.
"""

from __future__ import annotations

from bot.engine.types import Settings

_RATE_WEIGHT = 0.3  # weight of the newest batch in the moving average of rendering speed


class Speed:
    """The measured rendering speed: seconds per image for each settings, and per pixel-step over all of them."""

    def __init__(self) -> None:
        self._seconds_per_image: dict[Settings, float] = {}
        self._seconds_per_work: float | None = None

    @property
    def measured(self) -> bool:
        """Whether any batch was measured yet: before that, nothing can be estimated."""
        return self._seconds_per_work is not None

    def estimate(self, settings: Settings, images: int) -> float | None:
        """Return the seconds a call of ``images`` images with these settings should take; None before any batch."""
        per_image = self._seconds_per_image.get(settings)
        if per_image is not None:
            return per_image * images
        if self._seconds_per_work is None:
            return None
        return self._seconds_per_work * images * settings.width * settings.height * settings.steps

    def measure(self, settings: Settings, images: int, seconds: float) -> None:
        """Fold one call's time into the moving averages the estimates come from."""
        per_image = seconds / images
        old = self._seconds_per_image.get(settings)
        self._seconds_per_image[settings] = per_image if old is None else _average(old, per_image)
        per_work = per_image / (settings.width * settings.height * settings.steps)
        old = self._seconds_per_work
        self._seconds_per_work = per_work if old is None else _average(old, per_work)


def _average(old: float, new: float) -> float:
    return (1 - _RATE_WEIGHT) * old + _RATE_WEIGHT * new
