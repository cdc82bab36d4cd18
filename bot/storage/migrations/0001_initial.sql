-- One row per request: /imagine, a reroll or a variation. Settings are columns so they can be queried.
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    kind            TEXT    NOT NULL CHECK (kind IN ('imagine', 'reroll', 'variation')),
    parent_job_id   INTEGER REFERENCES jobs (id),
    parent_index    INTEGER,
    user_id         INTEGER NOT NULL,
    guild_id        INTEGER,
    channel_id      INTEGER NOT NULL,
    prompt          TEXT    NOT NULL,
    negative_prompt TEXT    NOT NULL DEFAULT '',
    seed            INTEGER NOT NULL,
    count           INTEGER NOT NULL CHECK (count BETWEEN 1 AND 16),
    steps           INTEGER NOT NULL,
    guidance        REAL    NOT NULL,
    width           INTEGER NOT NULL,
    height          INTEGER NOT NULL,
    mode            TEXT    NOT NULL CHECK (mode IN ('txt2img', 'img2img')),
    strength        REAL    NOT NULL,
    model           TEXT    NOT NULL,
    scheduler       TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'queued'
                            CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    error           TEXT,
    message_id      INTEGER,
    created_at      REAL    NOT NULL,
    started_at      REAL,
    finished_at     REAL
);
CREATE INDEX jobs_by_status ON jobs (status, id);
CREATE INDEX jobs_by_user ON jobs (user_id, created_at);

-- One row per finished image of a job.
CREATE TABLE images (
    job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    seed   INTEGER NOT NULL,
    nsfw   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);

-- One vote per user per image; voting the same way again withdraws it.
CREATE TABLE votes (
    job_id     INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    vote       INTEGER NOT NULL CHECK (vote IN (-1, 1)),
    updated_at REAL    NOT NULL,
    PRIMARY KEY (job_id, idx, user_id),
    FOREIGN KEY (job_id, idx) REFERENCES images (job_id, idx) ON DELETE CASCADE
);
