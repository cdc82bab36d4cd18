-- Upscale ×2 is a job kind of its own. SQLite cannot change a CHECK constraint in place, so the jobs table is
-- rebuilt (SQLite's "making other kinds of table schema changes" procedure): a new table with the same columns in
-- the same order, every row copied with its id, the old table dropped and the new one renamed; then its indexes,
-- and the triggers whose bodies read jobs (dropped first: a rename re-checks every trigger), are made again.
-- migrate() runs this with foreign keys off (so dropping jobs cascades to nothing) and checks them before committing.
CREATE TABLE jobs_new (
    id              INTEGER PRIMARY KEY,
    kind            TEXT    NOT NULL CHECK (kind IN ('imagine', 'reroll', 'variation', 'upscale')),
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
    finished_at     REAL,
    reply_token      TEXT,     -- 0002
    reply_message_id INTEGER,  -- 0002
    reply_at         REAL,     -- 0002
    revision         TEXT      -- 0006
);
INSERT INTO jobs_new (
    id, kind, parent_job_id, parent_index, user_id, guild_id, channel_id, prompt, negative_prompt, seed, count, steps,
    guidance, width, height, mode, strength, model, scheduler, status, error, message_id, created_at, started_at,
    finished_at, reply_token, reply_message_id, reply_at, revision
)
SELECT
    id, kind, parent_job_id, parent_index, user_id, guild_id, channel_id, prompt, negative_prompt, seed, count, steps,
    guidance, width, height, mode, strength, model, scheduler, status, error, message_id, created_at, started_at,
    finished_at, reply_token, reply_message_id, reply_at, revision
FROM jobs;

DROP TRIGGER images_stats;
DROP TRIGGER job_tags_stats;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;

CREATE INDEX jobs_by_status ON jobs (status, id);
CREATE INDEX jobs_by_user ON jobs (user_id, created_at);
CREATE INDEX jobs_by_guild_user ON jobs (guild_id, user_id, created_at);
CREATE INDEX jobs_by_parent ON jobs (parent_job_id, parent_index);

-- As in 0004_stats.sql.
CREATE TRIGGER images_stats AFTER INSERT ON images BEGIN
    UPDATE images SET
        (guild_id, user_id) = (SELECT guild_id, user_id FROM jobs WHERE jobs.id = NEW.job_id),
        (up, down) = (SELECT COUNT(*) FILTER (WHERE vote = 1), COUNT(*) FILTER (WHERE vote = -1) FROM votes
                      WHERE votes.job_id = NEW.job_id AND votes.idx = NEW.idx)
    WHERE job_id = NEW.job_id AND idx = NEW.idx;
END;

CREATE TRIGGER job_tags_stats AFTER INSERT ON job_tags BEGIN
    UPDATE job_tags SET
        (guild_id, user_id) = (SELECT guild_id, user_id FROM jobs WHERE jobs.id = NEW.job_id),
        (up, down) = (SELECT COUNT(*) FILTER (WHERE vote = 1), COUNT(*) FILTER (WHERE vote = -1) FROM votes
                      WHERE votes.job_id = NEW.job_id),
        namespace_first = NOT EXISTS (SELECT 1 FROM job_tags AS other WHERE other.job_id = NEW.job_id
                                      AND other.namespace = NEW.namespace AND other.tag <> NEW.tag
                                      AND other.namespace_first)
    WHERE job_id = NEW.job_id AND namespace = NEW.namespace AND tag = NEW.tag;
END
