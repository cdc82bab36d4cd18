-- Servers whose moderators turned the blind A/B arena off (/mod arena off); absent: on.
CREATE TABLE arena_off (
    guild_id INTEGER PRIMARY KEY
)
