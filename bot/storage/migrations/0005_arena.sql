-- Placeholder for the arena's migration (issue 16, part A), built on another branch: merging that branch replaces
-- this file. It changes nothing, so that 0006 below may follow it.
SELECT 1
