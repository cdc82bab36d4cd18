-- Limits a moderator set: the server's default (scope 'server', target_id = the guild id), a role's or a user's.
-- A NULL field is not overridden and falls through to the next level.
CREATE TABLE limit_overrides (
    guild_id        INTEGER NOT NULL,
    scope           TEXT    NOT NULL CHECK (scope IN ('server', 'role', 'user')),
    target_id       INTEGER NOT NULL,
    images_per_hour INTEGER CHECK (images_per_hour >= 0),
    max_queued      INTEGER CHECK (max_queued >= 0),
    max_count       INTEGER CHECK (max_count >= 0),
    max_steps       INTEGER CHECK (max_steps >= 0),
    PRIMARY KEY (guild_id, scope, target_id)
);

-- Terms a server's moderators blocked, besides the config's prompts.blocklist.
CREATE TABLE blocked_terms (
    guild_id INTEGER NOT NULL,
    term     TEXT    NOT NULL,
    PRIMARY KEY (guild_id, term)
);

-- Channels where /imagine is allowed (then only there) or denied (never there).
CREATE TABLE channel_rules (
    guild_id   INTEGER NOT NULL,
    channel_id INTEGER NOT NULL,
    rule       TEXT    NOT NULL CHECK (rule IN ('allow', 'deny')),
    PRIMARY KEY (guild_id, channel_id)
);

CREATE TABLE bans (
    guild_id INTEGER NOT NULL,
    user_id  INTEGER NOT NULL,
    reason   TEXT,
    PRIMARY KEY (guild_id, user_id)
);

-- A paused server starts no new renders and accepts no new requests until a moderator resumes it.
CREATE TABLE pauses (
    guild_id INTEGER PRIMARY KEY,
    reason   TEXT
);

-- Every change a moderator made, written in the same transaction as the change.
CREATE TABLE audit_log (
    id           INTEGER PRIMARY KEY,
    guild_id     INTEGER NOT NULL,
    at           REAL    NOT NULL,
    moderator_id INTEGER NOT NULL,
    action       TEXT    NOT NULL,
    target       TEXT    NOT NULL,
    old          TEXT,
    new          TEXT,
    reason       TEXT
);
CREATE INDEX audit_by_guild ON audit_log (guild_id, id);

-- What a queued job needs to run again after a restart besides its row: a variation's source image.
CREATE TABLE job_inputs (
    job_id     INTEGER PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    init_image BLOB    NOT NULL
);

-- The interaction a job answers: its token (valid 15 minutes from reply_at) and the message showing its status,
-- so the result lands in that message also after a restart.
ALTER TABLE jobs ADD COLUMN reply_token TEXT;
ALTER TABLE jobs ADD COLUMN reply_message_id INTEGER;
ALTER TABLE jobs ADD COLUMN reply_at REAL;
CREATE INDEX jobs_by_guild_user ON jobs (guild_id, user_id, created_at);
