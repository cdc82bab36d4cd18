"""The security tests drive the real bot through the fake Discord with the cog tests' harness."""

from __future__ import annotations

from tests.cogs.conftest import harness as harness
