"""The Discord surface: one cog (package or module) per feature, each over a core module of bot/."""
