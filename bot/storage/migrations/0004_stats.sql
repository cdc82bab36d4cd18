-- /stats reads covering indexes only, in the order it groups by: each image and each job tag carries its
-- server, its maker and the votes on it, so no figure of a server joins or sorts its rows. The triggers below keep
-- these copies; nothing else writes them.
ALTER TABLE images ADD COLUMN guild_id INTEGER;               -- the job's, copied
ALTER TABLE images ADD COLUMN user_id INTEGER;                -- the job's, copied
ALTER TABLE images ADD COLUMN up INTEGER NOT NULL DEFAULT 0;  -- its votes, counted
ALTER TABLE images ADD COLUMN down INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_tags ADD COLUMN guild_id INTEGER;
ALTER TABLE job_tags ADD COLUMN user_id INTEGER;
ALTER TABLE job_tags ADD COLUMN up INTEGER NOT NULL DEFAULT 0;  -- the votes on all the job's images
ALTER TABLE job_tags ADD COLUMN down INTEGER NOT NULL DEFAULT 0;
-- 1 on one tag of each job and namespace, so that a namespace counts a job once however many of its tags it has.
ALTER TABLE job_tags ADD COLUMN namespace_first INTEGER NOT NULL DEFAULT 1;

UPDATE images SET
    (guild_id, user_id) = (SELECT guild_id, user_id FROM jobs WHERE jobs.id = images.job_id),
    (up, down) = (SELECT COUNT(*) FILTER (WHERE vote = 1), COUNT(*) FILTER (WHERE vote = -1) FROM votes
                  WHERE votes.job_id = images.job_id AND votes.idx = images.idx);
UPDATE job_tags SET
    (guild_id, user_id) = (SELECT guild_id, user_id FROM jobs WHERE jobs.id = job_tags.job_id),
    (up, down) = (SELECT COUNT(*) FILTER (WHERE vote = 1), COUNT(*) FILTER (WHERE vote = -1) FROM votes
                  WHERE votes.job_id = job_tags.job_id),
    namespace_first = tag = (SELECT MIN(tag) FROM job_tags AS other
                             WHERE other.job_id = job_tags.job_id AND other.namespace = job_tags.namespace);

-- An image takes its job's server and maker, and counts the votes already stored for it (an image rendered
-- again replaces its row).
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
END;

CREATE TRIGGER votes_stats_insert AFTER INSERT ON votes BEGIN
    UPDATE images SET up = up + (NEW.vote = 1), down = down + (NEW.vote = -1)
    WHERE job_id = NEW.job_id AND idx = NEW.idx;
    UPDATE job_tags SET up = up + (NEW.vote = 1), down = down + (NEW.vote = -1) WHERE job_id = NEW.job_id;
END;

CREATE TRIGGER votes_stats_update AFTER UPDATE OF vote ON votes BEGIN
    UPDATE images SET up = up + (NEW.vote = 1) - (OLD.vote = 1), down = down + (NEW.vote = -1) - (OLD.vote = -1)
    WHERE job_id = NEW.job_id AND idx = NEW.idx;
    UPDATE job_tags SET up = up + (NEW.vote = 1) - (OLD.vote = 1), down = down + (NEW.vote = -1) - (OLD.vote = -1)
    WHERE job_id = NEW.job_id;
END;

-- Also when an image is forgotten (storage.forget_deleted) and its votes go with it.
CREATE TRIGGER votes_stats_delete AFTER DELETE ON votes BEGIN
    UPDATE images SET up = up - (OLD.vote = 1), down = down - (OLD.vote = -1)
    WHERE job_id = OLD.job_id AND idx = OLD.idx;
    UPDATE job_tags SET up = up - (OLD.vote = 1), down = down - (OLD.vote = -1) WHERE job_id = OLD.job_id;
END;

-- One index per figure and scope, each in the order its query groups by. The hour of the day is UTC.
CREATE INDEX images_stats_by_guild
    ON images (guild_id, model_revision, CAST(created_at AS INTEGER) / 3600 % 24, created_at, up, down);
CREATE INDEX images_stats_by_user
    ON images (guild_id, user_id, model_revision, CAST(created_at AS INTEGER) / 3600 % 24, created_at, up, down);
CREATE INDEX job_tags_stats_by_guild ON job_tags (guild_id, namespace, tag, namespace_first, up, down);
CREATE INDEX job_tags_stats_by_user ON job_tags (guild_id, user_id, namespace, tag, namespace_first, up, down);
-- The votes a member cast.
CREATE INDEX votes_by_user ON votes (user_id, job_id, vote);
