-- What exactly made each image, so a vote can be tied to it when the model is trained again.
ALTER TABLE images ADD COLUMN model_revision TEXT;  -- the hub commit, or sha256 of a local folder's weight files
ALTER TABLE images ADD COLUMN dtype TEXT;
ALTER TABLE images ADD COLUMN compiled INTEGER;     -- 1 when the compiled UNet rendered it (pixels may differ by 1/255)
ALTER TABLE images ADD COLUMN batch_id INTEGER;     -- the images rendered in one GPU call share it
ALTER TABLE images ADD COLUMN batch_size INTEGER;
ALTER TABLE images ADD COLUMN waited_s REAL;        -- from the request to the start of its batch
ALTER TABLE images ADD COLUMN rendered_s REAL;      -- its batch's time on the GPU
ALTER TABLE images ADD COLUMN created_at REAL;
ALTER TABLE images ADD COLUMN deleted_at REAL;      -- its message was deleted; the row stays for the statistics
ALTER TABLE images ADD COLUMN file TEXT;            -- the PNG under the storage folder, with storage.keep_images
CREATE INDEX images_by_time ON images (created_at);
CREATE INDEX images_by_revision ON images (model_revision, created_at);

-- Each job's tags, so that questions per tag or namespace are indexed.
CREATE TABLE job_tags (
    job_id    INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    namespace TEXT    NOT NULL,
    tag       TEXT    NOT NULL,
    PRIMARY KEY (job_id, namespace, tag)
);
CREATE INDEX job_tags_by_tag ON job_tags (namespace, tag, job_id);
CREATE INDEX jobs_by_parent ON jobs (parent_job_id, parent_index);
