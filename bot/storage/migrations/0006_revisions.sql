-- The model revision a job asked for: NULL for the production one (model.revision), else the candidate as configured
-- (model.candidates). Which exact weights made each image is images.model_revision.
ALTER TABLE jobs ADD COLUMN revision TEXT
