-- The blind A/B arena: one prompt rendered by two model revisions, shown side by side without their names. The
-- revisions are copied from the images so that a pair says what it compared even if its images are re-recorded.
CREATE TABLE arena_pairs (
    id               INTEGER PRIMARY KEY,
    guild_id         INTEGER,
    channel_id       INTEGER NOT NULL,
    requester_id     INTEGER NOT NULL,
    left_job_id      INTEGER NOT NULL,
    left_index       INTEGER NOT NULL,
    left_revision    TEXT    NOT NULL,
    right_job_id     INTEGER NOT NULL,
    right_index      INTEGER NOT NULL,
    right_revision   TEXT    NOT NULL,
    -- Which side the production revision rendered; NULL when both are candidates.
    production_side  TEXT    CHECK (production_side IN ('left', 'right')),
    message_id       INTEGER,  -- the message showing the pair, once posted
    created_at       REAL    NOT NULL,
    posted_at        REAL,     -- when the message was posted: a vote's seconds are counted from here
    CHECK (left_job_id <> right_job_id OR left_index <> right_index),
    FOREIGN KEY (left_job_id, left_index) REFERENCES images (job_id, idx) ON DELETE CASCADE,
    FOREIGN KEY (right_job_id, right_index) REFERENCES images (job_id, idx) ON DELETE CASCADE
);
CREATE INDEX arena_pairs_by_guild ON arena_pairs (guild_id, id);
CREATE INDEX arena_pairs_by_left ON arena_pairs (left_job_id, left_index);
CREATE INDEX arena_pairs_by_right ON arena_pairs (right_job_id, right_index);

-- One vote per member per pair: a changed vote replaces the old one. Every vote is stored; whether it counts
-- (arena.max_votes_per_day) is decided when the votes are read.
CREATE TABLE arena_votes (
    pair_id   INTEGER NOT NULL REFERENCES arena_pairs (id) ON DELETE CASCADE,
    user_id   INTEGER NOT NULL,
    choice    TEXT    NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),
    voted_at  REAL    NOT NULL,
    seconds   REAL,  -- from the post to the vote; NULL when the post time is unknown
    PRIMARY KEY (pair_id, user_id)
);
-- A member's votes by time: the daily cap and the suspicious-voter figures read them in this order.
CREATE INDEX arena_votes_by_user ON arena_votes (user_id, voted_at);
